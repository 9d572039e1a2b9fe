import pytest
from omegaconf import OmegaConf

from chatumm_kit.config import DEFAULT_ALLOW_LIST, RecipeError, load_recipe, resolve_callable, validate_recipe


def _problems(cfg, **kw):
    with pytest.raises(RecipeError) as e:
        validate_recipe(OmegaConf.create(cfg), **kw)
    return e.value.problems


def test_misspelled_key_names_path_argument_and_callable():
    cfg = {"model": {"vit": {"_component_": "torch.nn.Linear", "in_features": 2, "out_featres": 3}}}
    (msg,) = _problems(cfg)
    assert msg.startswith("model.vit.out_featres: unexpected keyword argument 'out_featres' for torch.nn.Linear")
    assert "accepted: in_features, out_features, bias" in msg


def test_unknown_component():
    (msg,) = _problems({"m": {"_component_": "torch.nn.Lineer"}})
    assert msg.startswith(
        "m._component_: 'torch.nn.Lineer' is not on the recipe allow-list (did you mean torch.nn.Linear?)"
    )
    (msg,) = _problems({"m": {"_component_": "chatumm_kit.nothing_here.Thing"}})
    assert "'chatumm_kit.nothing_here.Thing' is not on the recipe allow-list" in msg
    # a listed name whose module lacks it (a moved class) says so
    allow = DEFAULT_ALLOW_LIST.extended(names=["torch.nn.Lineer"])
    (msg,) = _problems({"m": {"_component_": "torch.nn.Lineer"}}, allow=allow)
    assert msg == "m._component_: unknown _component_ 'torch.nn.Lineer': 'torch.nn' has no attribute 'Lineer'"


@pytest.mark.parametrize(
    ("dotted", "fragment"),
    [
        ("os.system", "is not on the recipe allow-list"),
        ("builtins.eval", "is not on the recipe allow-list"),
        ("subprocess.run", "is not on the recipe allow-list"),
        ("torch.os.system", "is not on the recipe allow-list"),
        ("torch.load", "is not on the recipe allow-list"),
        ("torch.utils.collect_env.run", "is not on the recipe allow-list"),
        ("torch.optim.AdamW.load_state_dict", "is not on the recipe allow-list"),
        ("torch._C._get_tracing_state", "private"),
        ("torch.nn.Linear.__init__.__globals__", "private"),
    ],
)
def test_allow_list_refuses_code_execution_paths(dotted, fragment):
    (msg,) = _problems({"x": {"_component_": dotted}})
    assert msg.startswith("x._component_:") and fragment in msg


def test_user_additions_are_allowed_only_when_given():
    import json

    with pytest.raises(RecipeError, match="not on the recipe allow-list"):
        resolve_callable("json.loads")
    assert resolve_callable("json.loads", allow=DEFAULT_ALLOW_LIST.extended(names=["json.loads"])) is json.loads
    by_root = DEFAULT_ALLOW_LIST.extended(roots=["json"])
    assert resolve_callable("json.loads", allow=by_root) is json.loads
    assert not by_root.admits("jsonschema.validate")  # a root is a package prefix, not a string prefix
    with pytest.raises(RecipeError, match="resolves to re, outside the roots allowed"):
        resolve_callable("json.decoder.re.compile", allow=DEFAULT_ALLOW_LIST.extended(roots=["json"]))


def test_near_miss_names_the_listed_spelling():
    (msg,) = _problems({"cb": {"_component_": "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"}})
    assert "did you mean lightning.pytorch.callbacks.ModelCheckpoint?" in msg


def test_wrong_types_are_reported():
    cfg = {
        "lin": {"_component_": "torch.nn.Linear", "in_features": "two", "out_features": 2.5, "bias": "yes"},
    }
    msgs = _problems(cfg)
    assert "lin.in_features: expected int for torch.nn.Linear, got str 'two'" in msgs
    assert "lin.out_features: expected int for torch.nn.Linear, got float 2.5" in msgs
    assert "lin.bias: expected bool for torch.nn.Linear, got str 'yes'" in msgs


def test_nested_component_type_is_checked_against_annotation():
    # torch.nn.Sequential(*args: Module) has no annotated kwargs; use a chatumm_kit callable with a typed parameter
    # (two helpers that are not recipe material, admitted for this test)
    allow = DEFAULT_ALLOW_LIST.extended(names=["chatumm_kit.config.check_type", "chatumm_kit.config.find_recipe"])
    bad = {"x": {"_component_": "chatumm_kit.config.check_type", "value": 1, "annotation": None, "built_class": 1}}
    validate_recipe(OmegaConf.create(bad), allow=allow)  # built_class: Any — accepted
    wrong = {"x": {"_component_": "chatumm_kit.config.find_recipe", "name": {"_component_": "torch.nn.Linear"}}}
    (msg,) = _problems(wrong, allow=allow)
    assert msg.startswith("x.name: expected ") and "got dict" in msg


def test_all_problems_reported_at_once_and_valid_recipe_passes():
    cfg = {
        "a": {"_component_": "torch.nn.Linear", "in_features": 2, "out_features": 3},
        "b": [{"_component_": "torch.nn.Dropout", "pp": 0.1}, {"_component_": "torch.nn.ReLU", "inplace": 1}],
    }
    msgs = _problems(cfg)
    assert msgs[0].startswith("b[0].pp: unexpected keyword argument 'pp' for torch.nn.Dropout")
    assert msgs[1] == "b[1].inplace: expected bool for torch.nn.ReLU, got int 1"
    del cfg["b"]
    validate_recipe(OmegaConf.create(cfg))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(RecipeError, match=r"recipe not found: 'nope/missing.yaml'"):
        load_recipe("nope/missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: malformed YAML at line \d+, column \d+"):
        load_recipe(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="must be a mapping at the top level"):
        load_recipe(notmap)
