"""Load SparseML-format YAML recipes into modifier objects.

Format (SparseML, Neural Magic; see seeds 001/002): a YAML mapping whose keys ending in
``modifiers`` hold lists of ``!ModifierName`` tagged mappings; every other top-level key is a
variable that modifier values may reference by name or inside ``eval(...)``. Markdown recipes
(YAML front matter between ``---`` lines) load too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import pydantic
import yaml

from .errors import RecipeError
from .expressions import resolve_value

__all__ = ["Recipe", "load_recipe"]


@dataclasses.dataclass
class _Tagged:
    """A ``!Name {mapping}`` node as read from YAML, before it becomes a modifier."""

    tag: str
    fields: dict
    line: int


class _Loader(yaml.SafeLoader):
    pass


def _construct_tagged(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> _Tagged:
    fields = loader.construct_mapping(node, deep=True) if isinstance(node, yaml.MappingNode) else {}
    return _Tagged(tag_suffix, dict(fields), node.start_mark.line + 1)


_Loader.add_multi_constructor("!", _construct_tagged)


class _Dumper(yaml.SafeDumper):
    pass


def _represent_tagged(dumper: yaml.SafeDumper, data: _Tagged) -> yaml.Node:
    return dumper.represent_mapping("!" + data.tag, data.fields)


_Dumper.add_representer(_Tagged, _represent_tagged)


@dataclasses.dataclass
class Recipe:
    """A parsed recipe.

    Attributes:
        source: the file it came from (``"<string>"`` for text).
        variables: resolved top-level variables (after overrides).
        groups: group key (e.g. ``"pruning_modifiers"``) -> list of modifiers, in file order.
    """

    source: str
    variables: dict[str, Any]
    groups: dict[str, list]

    @property
    def modifiers(self) -> list:
        """All modifiers, in file order."""
        return [m for group in self.groups.values() for m in group]

    @property
    def num_epochs(self) -> float | None:
        """Training length the recipe asks for: the largest ``end_epoch`` of any modifier.

        ``None`` when no modifier has an end (``end_epoch`` < 0 means "until training ends").
        """
        ends = [m.end_epoch for m in self.modifiers if getattr(m, "end_epoch", -1) is not None]
        ends = [e for e in ends if e >= 0]
        return max(ends) if ends else None

    def to_yaml(self) -> str:
        """The recipe as applied: variables resolved, in SparseML's ``!Name`` format.

        Loading the output with :func:`load_recipe` gives equal modifiers (lossless round trip).
        """
        doc: dict[str, Any] = dict(self.variables)
        for key, mods in self.groups.items():
            doc[key] = [_Tagged(type(m).__name__, m.recipe_fields(), 0) for m in mods]
        return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=None)


def _read_text(recipe: str | Path) -> tuple[str, str]:
    """Return (text, source name). A string containing a newline or ``!`` tag is recipe text."""
    if isinstance(recipe, Path) or ("\n" not in str(recipe) and not str(recipe).lstrip().startswith("{")):
        path = Path(recipe)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}", source=str(path))
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as e:
            raise RecipeError(f"not UTF-8 text ({e})", source=str(path)) from None
    return str(recipe), "<string>"


def _front_matter(text: str) -> str:
    """Markdown recipes keep their YAML between the first two ``---`` lines."""
    lines = text.splitlines()
    if lines and lines[0].strip() == "---":
        for i, line in enumerate(lines[1:], start=1):
            if line.strip() == "---":
                return "\n".join(lines[1:i])
    return text


def _resolve_variables(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Resolve variables that refer to other variables, in file order (SparseML semantics)."""
    resolved: dict[str, Any] = {}
    for name, value in raw.items():
        try:
            resolved[name] = resolve_value(value, resolved)
        except ValueError as e:
            raise RecipeError(str(e), source=source, key=name, value=value) from None
    return resolved


def load_recipe(recipe: str | Path, overrides: Mapping[str, Any] | None = None) -> Recipe:
    """Parse a recipe file (``.yaml``/``.md``) or recipe text into modifiers.

    Args:
        recipe: path to the recipe, or the YAML text itself.
        overrides: variable name -> value, replacing the file's top-level variables before
            resolution (SparseML's ``recipe_args``), e.g. ``{"num_epochs": 2}``.

    Returns:
        A :class:`Recipe` whose modifiers are validated pydantic objects.

    Raises:
        RecipeError: file missing, YAML syntax, unknown modifier or key, a bad value, an
            override for an unknown variable. The message names file, modifier, key and value.
    """
    from .registry import MODIFIERS

    text, source = _read_text(recipe)
    try:
        doc = yaml.load(_front_matter(text), Loader=_Loader)
    except yaml.YAMLError as e:
        raise RecipeError(f"invalid YAML: {e}", source=source) from None
    if not isinstance(doc, dict):
        raise RecipeError("a recipe must be a YAML mapping of variables and *_modifiers lists", source=source)

    for key, value in doc.items():  # `x_modifiers: !Name {...}` without the list dash
        if isinstance(value, _Tagged):
            raise RecipeError(f"!{value.tag} (line {value.line}) must be an item of a '*_modifiers' list: "
                              f"write '{key}:' and then '  - !{value.tag}' on the next line", source=source, key=str(key))
    group_keys = [k for k, v in doc.items() if str(k).endswith("modifiers") and isinstance(v, list)]
    raw_vars = {k: v for k, v in doc.items() if k not in group_keys}
    for name, value in (overrides or {}).items():
        if name not in raw_vars:
            raise RecipeError(
                f"override for unknown variable (recipe variables: {sorted(raw_vars)})",
                source=source, key=name, value=value,
            )
        raw_vars[name] = value
    variables = _resolve_variables(raw_vars, source)

    groups: dict[str, list] = {}
    for key in group_keys:
        groups[key] = []
        for index, item in enumerate(doc[key]):
            where = f"{key}[{index}]"
            if not isinstance(item, _Tagged):
                raise RecipeError(f"expected a '!ModifierName' tagged mapping, got {item!r}", source=source, modifier=where)
            where = f"{where} !{item.tag} (line {item.line})"
            if item.tag not in MODIFIERS:
                raise RecipeError(
                    f"unknown modifier !{item.tag}; known: {', '.join(sorted(MODIFIERS))}",
                    source=source, modifier=where,
                )
            try:
                fields = {k: resolve_value(v, variables) for k, v in item.fields.items()}
            except ValueError as e:
                raise RecipeError(str(e), source=source, modifier=where) from None
            groups[key].append(build_modifier(MODIFIERS[item.tag], fields, source, where))
    if not any(groups.values()):
        raise RecipeError("the recipe has no modifiers (no '*_modifiers' list)", source=source)
    return Recipe(source=source, variables=variables, groups=groups)


def build_modifier(cls: type, fields: dict, source: str, where: str):
    """Construct modifier ``cls`` from ``fields``, turning pydantic errors into :class:`RecipeError`."""
    try:
        modifier = cls(**fields)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or None
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        value = err.get("input")
        if key and key.startswith("mask_type") and isinstance(value, int):  # YAML 1.1: 2:4 is base 60, = 124
            msg += "; quote an N:M pattern (mask_type: \"2:4\"): unquoted, YAML reads 2:4 as the number 124"
        raise RecipeError(msg, source=source, modifier=where, key=key, value=value) from None
    modifier.set_origin(source, where)
    return modifier
