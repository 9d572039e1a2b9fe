"""The recipe engine: YAML + overrides → validated, allow-listed ``_component_`` builds."""

from chatumm_kit.config.errors import RecipeError
from chatumm_kit.config.imports import DEFAULT_ALLOWED_ROOTS, resolve_callable
from chatumm_kit.config.instantiate import instantiate
from chatumm_kit.config.recipe import apply_overrides, find_recipe, load_recipe, recipes_root, to_yaml
from chatumm_kit.config.validate import check_type, validate_recipe

__all__ = [
    "DEFAULT_ALLOWED_ROOTS",
    "RecipeError",
    "apply_overrides",
    "check_type",
    "find_recipe",
    "instantiate",
    "load_recipe",
    "recipes_root",
    "resolve_callable",
    "to_yaml",
    "validate_recipe",
]
