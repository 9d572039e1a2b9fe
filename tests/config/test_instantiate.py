import functools

import pytest
import torch
from omegaconf import OmegaConf

from chatumm_kit.config import RecipeError, apply_overrides, instantiate, load_recipe, to_yaml


def test_nested_nodes_lists_and_plain_mappings_are_built():
    seq = instantiate(
        OmegaConf.create(
            {
                "_component_": "torch.nn.ModuleList",
                "modules": [
                    {"_component_": "torch.nn.Linear", "in_features": 2, "out_features": 3},
                    {"_component_": "torch.nn.Linear", "in_features": 3, "out_features": 4, "bias": False},
                ],
            }
        )
    )
    assert isinstance(seq, torch.nn.ModuleList)
    assert [tuple(m.weight.shape) for m in seq] == [(3, 2), (4, 3)]
    assert seq[1].bias is None
    plain = instantiate(OmegaConf.create({"a": {"b": [1, {"_component_": "torch.nn.Identity"}]}}))
    assert plain["a"]["b"][0] == 1 and isinstance(plain["a"]["b"][1], torch.nn.Identity)


def test_call_site_arguments_override_and_complete_the_recipe():
    node = OmegaConf.create({"_component_": "torch.optim.SGD", "lr": 0.5, "momentum": 0.9})
    p = torch.nn.Parameter(torch.zeros(2))
    opt = instantiate(node, [p], lr=0.1)
    assert opt.defaults["lr"] == 0.1 and opt.defaults["momentum"] == 0.9


def test_partial_returns_a_factory():
    node = OmegaConf.create({"_component_": "torch.optim.AdamW", "_partial_": True, "lr": 3e-4})
    factory = instantiate(node)
    assert isinstance(factory, functools.partial)
    opt = factory([torch.nn.Parameter(torch.zeros(1))])
    assert opt.defaults["lr"] == 3e-4


def test_interpolation_and_overrides(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(
        "width: 8\n"
        "model:\n  _component_: torch.nn.Linear\n  in_features: ${width}\n  out_features: 2\n"
        "extra: {a: 1, b: 2}\n"
    )
    cfg = load_recipe(f, ["width=5", "+model.bias=false", "~extra.b", "extra.a=[1, 2]"])
    lin = instantiate(cfg.model)
    assert tuple(lin.weight.shape) == (2, 5) and lin.bias is None
    assert OmegaConf.to_container(cfg.extra) == {"a": [1, 2]}
    assert "in_features: 5" in to_yaml(cfg)


def test_overrides_reach_integer_mapping_keys_and_list_items(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("targets:\n  distance: {0: 0.5, 2: 0.25, 8: 0.25}\nstages: [{k: 1}, {k: 2}]\n")
    cfg = load_recipe(f, ["targets.distance.0=0.3", "~targets.distance.8", "stages.1.k=5"])
    assert OmegaConf.to_container(cfg.targets.distance) == {0: 0.3, 2: 0.25}  # int keys stay ints, no "0" added
    assert cfg.stages[1].k == 5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.in_featurs=3", "model.in_featurs: no such key in the recipe (keys here: _component_, in_features)"),
        ("+model.in_features=3", "model.in_features: already in the recipe"),
        ("~model.nope", "model.nope: cannot delete, no such key"),
        ("model", "model: an override must look like key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    cfg = OmegaConf.create({"model": {"_component_": "torch.nn.Linear", "in_features": 2}})
    with pytest.raises(RecipeError) as e:
        apply_overrides(cfg, [override])
    assert message in str(e.value)


def test_unresolvable_interpolation_names_its_path(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("a:\n  b: ${nothere}\n")
    with pytest.raises(RecipeError, match=r"a\.b: cannot resolve interpolation '\$\{nothere\}'"):
        load_recipe(f)


def test_build_failure_names_node_and_callable():
    node = OmegaConf.create({"model": {"_component_": "torch.nn.Linear", "in_features": 2}})
    with pytest.raises(RecipeError, match=r"model: building torch.nn.Linear failed: .*out_features"):
        instantiate(node.model, path="model")


def test_a_system_receives_its_model_spec_and_schedule_as_nodes_not_built_objects():
    """ChatUMMSystem lists model and schedule in config_arguments: instantiate hands them over unbuilt, so the
    hyperparameters hold the spec (a checkpoint rebuilds from it) and the model is built in configure_model."""
    node = {
        "_component_": "chatumm_kit.systems.unified.ChatUMMSystem",
        "model": {"_component_": "chatumm_kit.presets.chatumm_tiny", "vocab_size": 300, "hidden_size": 32},
        "schedule": {"_component_": "chatumm_kit.training.schedules.CosineSchedule", "total_steps": 10},
    }
    system = instantiate(OmegaConf.create(node))
    assert system.model is None
    assert system.hparams.model == node["model"] and system.hparams.schedule == node["schedule"]
    system.configure_model()
    assert system.model.hidden_size == 32
