"""The recipe engine: YAML + overrides → validated, allow-listed ``_component_`` builds."""

from chatumm_kit.config.allowlist import (
    DEFAULT_ALLOW_LIST,
    RECIPE_CALLABLES,
    AllowList,
    allow_list_from_args,
    current_allow_list,
    using_allow_list,
)
from chatumm_kit.config.errors import RecipeError
from chatumm_kit.config.imports import check_allowed, resolve_callable
from chatumm_kit.config.instantiate import instantiate
from chatumm_kit.config.recipe import apply_overrides, find_recipe, load_recipe, recipes_root, to_yaml
from chatumm_kit.config.secrets import env_values, find_env_value, install_env_tracking, redact
from chatumm_kit.config.validate import check_type, validate_recipe

__all__ = [
    "DEFAULT_ALLOW_LIST",
    "RECIPE_CALLABLES",
    "AllowList",
    "RecipeError",
    "allow_list_from_args",
    "apply_overrides",
    "check_allowed",
    "check_type",
    "current_allow_list",
    "find_recipe",
    "instantiate",
    "load_recipe",
    "recipes_root",
    "resolve_callable",
    "to_yaml",
    "using_allow_list",
    "validate_recipe",
    "env_values",
    "find_env_value",
    "redact",
]

install_env_tracking()  # ${oc.env:VAR} values are remembered, so what the kit writes and sends can leave them out
