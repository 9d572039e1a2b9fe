"""Loading recipes: YAML file → OmegaConf tree, with command-line overrides applied and interpolations checked.

Overrides follow the usual conventions:

* ``a.b=value`` sets an existing key (a misspelled key is an error, not a silent new key);
* ``+a.b=value`` adds a key that does not exist yet;
* ``~a.b`` deletes a key.

Values are parsed as YAML scalars/flow collections (``3``, ``1e-3``, ``true``, ``[1, 2]``, ``null``).

Example:
    >>> cfg = load_recipe("recipes/shapes/chat_tiny.yaml", ["trainer.max_steps=50"])  # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from chatumm_kit.config.errors import RecipeError
from chatumm_kit.config.secrets import redact

__all__ = [
    "load_recipe",
    "apply_overrides",
    "resolve_recipe",
    "to_yaml",
    "recipes_root",
    "find_recipe",
    "parse_yaml",
    "check_interpolation_size",
    "MAX_YAML_NODES",
    "MAX_INTERPOLATED_CHARS",
]

# A recipe is a few hundred nodes; aliases may share nodes, but expanded (as OmegaConf copies them) the document must
# stay small, or a 300-byte file of nested aliases (``&a [*b, *b, ...]``) expands to gigabytes.
MAX_YAML_NODES = 200_000


def _expanded_size(node: yaml.Node, memo: dict[int, int], stack: set[int], limit: int) -> int:
    """Nodes in ``node`` once every alias is copied out; stops counting past ``limit``."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in stack:
        raise RecipeError("a YAML alias refers to a node that contains it (a recursive alias)")
    stack.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    for child in children:
        total += _expanded_size(child, memo, stack, limit)
        if total > limit:
            break
    stack.discard(key)
    memo[key] = total
    return total


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no python tags) that refuses documents whose aliases expand past :data:`MAX_YAML_NODES`."""

    def compose_document(self):
        node = super().compose_document()
        if node is not None and _expanded_size(node, {}, set(), MAX_YAML_NODES) > MAX_YAML_NODES:
            raise RecipeError(f"YAML aliases expand to more than {MAX_YAML_NODES} nodes (an alias bomb?)")
        return node


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` with alias expansion bounded; raises :class:`RecipeError` (without a location prefix)."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise RecipeError("YAML nested too deeply") from None


def recipes_root() -> Path:
    """The folder of recipes shipped with the kit (``recipes/`` of the checkout, linked into the package)."""
    return Path(__file__).resolve().parent.parent / "recipes"


def find_recipe(name: str | Path) -> Path:
    """A path as given if it exists, else a shipped recipe by relative name (``shapes/chat_tiny[.yaml]``)."""
    p = Path(name)
    if p.is_file():
        return p
    root = recipes_root()
    for candidate in (root / p, root / p.with_suffix(".yaml")):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(str(r.relative_to(root)) for r in sorted(root.rglob("*.yaml"))) if root.is_dir() else "none"
    raise RecipeError(f"recipe not found: {str(name)!r} (shipped recipes: {shipped})")


def load_recipe(
    path: str | Path, overrides: Sequence[str] = (), *, defaults: Mapping[str, Any] | None = None
) -> DictConfig:
    """Read a YAML recipe, apply overrides, and check that every interpolation resolves.

    ``defaults`` are top-level keys a command always understands (``resume_from`` for ``train``): set when the
    recipe lacks them, so ``key=value`` overrides them without a ``+``.
    """
    file = find_recipe(path)
    try:
        raw = parse_yaml(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(f"{file}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except RecipeError as e:
        raise RecipeError(f"{file}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{file}: malformed YAML{at}: {getattr(e, 'problem', e)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{file}: a recipe must be a mapping at the top level, got {type(raw).__name__}")
    for key, value in (defaults or {}).items():
        raw.setdefault(key, value)
    cfg = OmegaConf.create(raw)
    apply_overrides(cfg, overrides)
    check_interpolation_size(cfg)
    resolve_recipe(cfg)
    return cfg


def _parse_value(text: str, where: str) -> Any:
    try:
        return parse_yaml(text) if text != "" else ""
    except RecipeError as e:
        raise RecipeError(f"{where}: cannot parse override value {text!r}: {e}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: cannot parse override value {text!r}: {e}") from None


def _child_key(node: Any, part: str) -> str | int | None:
    """The key of ``node`` that one override path segment names, or None.

    A segment is text, but a mapping may have integer keys (``distance: {0: 0.5, 2: 0.25}`` in YAML), so
    ``synth.targets.distance.0`` names the key ``0``; a list takes a segment as its index.
    """
    if isinstance(node, DictConfig):
        if part in node:
            return part
        if part.lstrip("-").isdigit() and int(part) in node:
            return int(part)
    elif isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
        return int(part)
    return None


def _existing_path(cfg: DictConfig, dotted: str) -> list[str | int] | None:
    """The actual keys along ``dotted`` when every one exists, else None."""
    node: Any = cfg
    keys: list[str | int] = []
    for part in dotted.split("."):
        key = _child_key(node, part)
        if key is None:
            return None
        keys.append(key)
        node = node._get_node(key)
    return keys


def _has_key(cfg: DictConfig, dotted: str) -> bool:
    return _existing_path(cfg, dotted) is not None


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Apply ``key=value``, ``+key=value`` and ``~key`` overrides in place; return ``cfg``."""
    for item in overrides:
        if item.startswith("~"):
            key = item[1:].split("=", 1)[0]
            if not _has_key(cfg, key):
                raise RecipeError(f"{key}: cannot delete, no such key in the recipe")
            *above, leaf = _existing_path(cfg, key)
            parent: Any = cfg
            for k in above:
                parent = parent[k]
            del parent[leaf]
            continue
        if "=" not in item:
            raise RecipeError(f"{item}: an override must look like key=value, +key=value or ~key")
        key, value = item.split("=", 1)
        adding = key.startswith("+")
        key = key.lstrip("+")
        if not key:
            raise RecipeError(f"{item}: empty key in override")
        exists = _has_key(cfg, key)
        if not exists and not adding:
            parent_key = key.rpartition(".")[0]
            parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
            hint = ""
            if isinstance(parent, DictConfig):
                hint = f" (keys here: {', '.join(str(k) for k in parent.keys())})"
            raise RecipeError(f"{key}: no such key in the recipe{hint}; use +{key}=... to add one")
        if exists and adding:
            raise RecipeError(f"{key}: already in the recipe; drop the '+' to override it")
        try:
            keys = _existing_path(cfg, key)
            if keys is None:
                OmegaConf.update(cfg, key, _parse_value(value, key), merge=False, force_add=adding)
            else:  # walk the actual keys: an integer mapping key is not the text of its path segment
                parent = cfg
                for k in keys[:-1]:
                    parent = parent[k]
                parent[keys[-1]] = _parse_value(value, key)
        except OmegaConfBaseException as e:
            raise RecipeError(f"{key}: cannot apply override: {e.msg if hasattr(e, 'msg') else e}") from None
    return cfg


def _walk(node: Any, path: str):
    yield path, node
    if isinstance(node, DictConfig):
        for k in node.keys():
            child = node._get_node(k)
            yield from _walk(child, f"{path}.{k}" if path else str(k))
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            yield from _walk(node._get_node(i), f"{path}[{i}]")


MAX_INTERPOLATED_CHARS = 1_000_000
_INTERPOLATION_REF = re.compile(r"(?<![\w.\]])(\.*[A-Za-z_][\w]*(?:\.[A-Za-z_0-9][\w]*|\[\d+\])*)")


def _raw(node: Any) -> Any:
    return node._value() if not isinstance(node, (DictConfig, ListConfig)) else node


def _node_at(cfg: DictConfig, path: str) -> Any:
    """The node at ``path`` without resolving anything (``key in cfg`` would resolve interpolations)."""
    node: Any = cfg
    for part in re.findall(r"[^.\[\]]+", path):
        if isinstance(node, DictConfig):
            keys = {str(k): k for k in node.keys()}
            if part not in keys:
                return None
            node = node._get_node(keys[part])
        elif isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node._get_node(int(part))
        else:
            return None
    return node


def check_interpolation_size(cfg: DictConfig, limit: int = MAX_INTERPOLATED_CHARS) -> None:
    """Refuse a recipe whose interpolations would expand past ``limit`` characters, before resolving any.

    OmegaConf resolves ``a2: ${a1}${a1}`` by resolving ``a1`` twice, so 20 such lines in 300 bytes take hours and
    gigabytes. Here each node's expanded size is estimated once (references inside ``${...}`` to existing nodes,
    relative ones included, counted at their own expanded size), which is linear in the recipe.
    """
    memo: dict[str, int] = {}
    stack: set[str] = set()

    def size(path: str, node: Any) -> int:
        if path in memo:
            return memo[path]
        if path in stack:
            return 0  # a cycle: resolve_recipe names it
        stack.add(path)
        total = 0
        if isinstance(node, DictConfig):
            for k in node.keys():
                total += size(f"{path}.{k}" if path else str(k), node._get_node(k))
        elif isinstance(node, ListConfig):
            for i in range(len(node)):
                total += size(f"{path}[{i}]", node._get_node(i))
        else:
            raw = _raw(node)
            text = raw if isinstance(raw, str) else str(raw)
            total = len(text)
            if isinstance(raw, str) and "${" in raw:
                parent = path.rsplit(".", 1)[0] if "." in path else ""
                for inner in re.findall(r"\$\{([^{}]*)", raw):
                    for ref in _INTERPOLATION_REF.findall(inner):
                        dots = len(ref) - len(ref.lstrip("."))
                        base = parent
                        for _ in range(max(0, dots - 1)):
                            base = base.rsplit(".", 1)[0] if "." in base else ""
                        target = (
                            ref.lstrip(".") if not dots else (f"{base}.{ref.lstrip('.')}" if base else ref.lstrip("."))
                        )
                        found = _node_at(cfg, target)
                        if found is not None:
                            total += size(target, found)
                        if total > limit:
                            break
        stack.discard(path)
        memo[path] = total
        if total > (limit if not isinstance(node, (DictConfig, ListConfig)) else 10 * limit):  # name the leaf first
            raise RecipeError(
                f"{path or '<root>'}: interpolations expand to more than {limit:,} characters (an interpolation bomb?)"
            )
        return total

    size("", cfg)


def resolve_recipe(cfg: DictConfig) -> None:
    """Resolve every interpolation once, raising :class:`RecipeError` with the path of each that fails."""
    problems = []
    for path, node in _walk(cfg, ""):
        if isinstance(node, (DictConfig, ListConfig)):
            continue
        try:
            node._dereference_node()
        except OmegaConfBaseException as e:
            msg = str(e).splitlines()[0]
            problems.append(f"{path}: cannot resolve interpolation {node._value()!r}: {msg}")
    if problems:
        raise RecipeError(problems)


def to_yaml(cfg: DictConfig) -> str:
    """The recipe with every interpolation resolved, as YAML text — except environment values, which stay
    ``${oc.env:VAR}`` (:func:`~chatumm_kit.config.secrets.redact`): this text is what runs save and print."""
    plain = redact(OmegaConf.to_container(cfg, resolve=True))
    return OmegaConf.to_yaml(OmegaConf.create(plain), resolve=False)
