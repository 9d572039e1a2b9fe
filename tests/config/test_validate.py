import pytest
from omegaconf import OmegaConf

from chatumm_kit.config import RecipeError, load_recipe, resolve_callable, validate_recipe


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
    assert msg == "m._component_: unknown _component_ 'torch.nn.Lineer': 'torch.nn' has no attribute 'Lineer'"
    (msg,) = _problems({"m": {"_component_": "chatumm_kit.nothing_here.Thing"}})
    assert "unknown _component_ 'chatumm_kit.nothing_here.Thing'" in msg


@pytest.mark.parametrize(
    ("dotted", "fragment"),
    [
        ("os.system", "outside the allowed import roots"),
        ("builtins.eval", "outside the allowed import roots"),
        ("subprocess.run", "outside the allowed import roots"),
        ("torch.os.system", "resolves to os, outside the allowed import roots"),
        ("torch.load", "denied in recipes"),
        ("torch.hub.load", "denied in recipes"),
        ("torch.utils.cpp_extension.load_inline", "denied in recipes"),
        ("torch._C._get_tracing_state", "private"),
        ("torch.nn.Linear.__init__.__globals__", "private"),
    ],
)
def test_allow_list_refuses_code_execution_paths(dotted, fragment):
    (msg,) = _problems({"x": {"_component_": dotted}})
    assert msg.startswith("x._component_:") and fragment in msg


def test_user_added_root_is_allowed_only_when_given():
    with pytest.raises(RecipeError, match="outside the allowed import roots"):
        resolve_callable("json.loads")
    import json

    assert resolve_callable("json.loads", allowed_roots={"json"}) is json.loads


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
    bad = {"x": {"_component_": "chatumm_kit.config.check_type", "value": 1, "annotation": None, "built_class": 1}}
    validate_recipe(OmegaConf.create(bad))  # built_class: Any — accepted
    wrong = {"x": {"_component_": "chatumm_kit.config.find_recipe", "name": {"_component_": "torch.nn.Linear"}}}
    (msg,) = _problems(wrong)
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
