"""The recipe allow-list itself: every entry exists and is a callable (a moved class fails here, not in a user's
run), the shipped recipes need nothing else, and the list names no module-level escape hatch."""

import inspect

import pytest
import yaml

from chatumm_kit.config import RECIPE_CALLABLES, recipes_root, resolve_callable


def test_every_listed_name_resolves_to_a_callable_that_is_not_a_module():
    for name in sorted(RECIPE_CALLABLES):
        obj = resolve_callable(name)
        assert callable(obj) and not inspect.ismodule(obj), name


def _components(node):
    if isinstance(node, dict):
        if "_component_" in node:
            yield node["_component_"]
        for v in node.values():
            yield from _components(v)
    elif isinstance(node, list):
        for v in node:
            yield from _components(v)


@pytest.mark.parametrize("recipe", sorted(p.name for p in recipes_root().rglob("*.yaml")))
def test_shipped_recipes_build_only_listed_callables(recipe):
    (path,) = [p for p in recipes_root().rglob("*.yaml") if p.name == recipe]
    names = set(_components(yaml.safe_load(path.read_text())))
    assert names and names <= RECIPE_CALLABLES, names - RECIPE_CALLABLES


def test_no_entry_is_a_known_way_to_run_code():
    risky_names = {"load", "loads", "exec", "eval", "system", "popen", "run", "run_path", "import_module", "gopen",
                   "from_pretrained", "create_model", "load_inline", "LambdaCallback", "compile"}  # fmt: skip
    risky_modules = {"hub", "collect_env", "cpp_extension", "serialization", "jit", "package", "pickle", "subprocess",
                     "os", "builtins", "runpy", "importlib", "shutil", "gopen", "datapipes"}  # fmt: skip
    for name in RECIPE_CALLABLES:
        *module, last = name.split(".")
        assert last not in risky_names and not risky_modules & set(module), name
