"""Recipes: YAML files that say which layers become which partial operator.

Validated with pydantic; every error names the file, line, field and the fix. Precedence when
several rules match a layer (lowest first, later ones override the fields they set):
defaults < rules selecting by type/predicates only < rules with a glob or ``re:`` name
< rules with an exact name; among equals, file order. See docs/recipes.md.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError

RATIO_WORDS = ("dynamic", "adaptive", "inherit")
SKIP_VARIANTS = ("skip", "none")


class IntRange(BaseModel):
    """Inclusive bounds; either may be omitted."""

    model_config = ConfigDict(extra="forbid")
    min: int | None = None
    max: int | None = None

    def contains(self, v: int | None) -> bool:
        return v is not None and (self.min is None or v >= self.min) and (self.max is None or v <= self.max)


class FloatRange(BaseModel):
    """Inclusive bounds on a float in [0, 1]."""

    model_config = ConfigDict(extra="forbid")
    min: float | None = Field(None, ge=0, le=1)
    max: float | None = Field(None, ge=0, le=1)

    def contains(self, v: float | None) -> bool:
        return v is not None and (self.min is None or v >= self.min) and (self.max is None or v <= self.max)


def _as_list(v):
    return v if isinstance(v, list) else [v]


class Select(BaseModel):
    """Which layers a rule applies to. Every given field must match (AND); list values mean OR."""

    model_config = ConfigDict(extra="forbid")
    type: str | list[str] | None = Field(None, description="class name (or dotted path), matched on the MRO")
    name: str | list[str] | None = Field(None, description="qualified name: exact, glob (* ? [...]) or re:REGEX")
    kernel: int | list[int] | None = None
    stride: int | list[int] | None = None
    groups: int | Literal["dense", "depthwise", "grouped"] | None = None
    dilation: int | list[int] | None = None
    in_channels: int | IntRange | None = None
    out_channels: int | IntRange | None = None
    spatial: int | IntRange | None = Field(None, description="input height of the layer (feature maps)")
    stage: int | list[int] | None = Field(None, description="log2(input/feature size) - 1: 1..4 in a classifier")
    depth: FloatRange | None = Field(None, description="relative position in the forward pass, 0..1")

    @field_validator("name")
    @classmethod
    def _regex_compiles(cls, v):
        for pat in _as_list(v) if v is not None else []:
            if pat.startswith("re:"):
                try:
                    re.compile(pat[3:])
                except re.error as e:
                    raise ValueError(f"bad regular expression {pat[3:]!r}: {e}") from None
        return v

    def name_kind(self) -> int:
        """0 no name, 1 glob/regex, 2 exact (the precedence of the rule)."""
        if self.name is None:
            return 0
        pats = _as_list(self.name)
        return 2 if all(not p.startswith("re:") and not any(c in p for c in "*?[") for p in pats) else 1


class Rule(BaseModel):
    """Select layers and say what they become. ``variant: skip`` leaves them alone."""

    model_config = ConfigDict(extra="forbid")
    select: Select
    variant: str | None = None
    ratio: float | Literal["dynamic", "adaptive", "inherit"] | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    note: str | None = None

    @field_validator("ratio")
    @classmethod
    def _ratio_range(cls, v):
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError("ratio must be in (0, 1]")
        return v


class Defaults(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: str = "pconv"
    ratio: float | Literal["dynamic", "adaptive", "inherit"] = 0.25
    params: dict[str, Any] = Field(default_factory=dict)


class Recipe(BaseModel):
    """A conversion recipe (see docs/recipes.md)."""

    model_config = ConfigDict(extra="forbid")
    version: Literal[1] = Field(description="recipe format version; 1")
    name: str | None = None
    description: str | None = None
    strict: bool = Field(True, description="a rule that matches no layer is an error")
    input_size: int | None = Field(None, description="example input size for discovery (default: model's)")
    defaults: Defaults = Field(default_factory=Defaults)
    rules: list[Rule] = Field(min_length=1)
    ignore: list[str] = Field(default_factory=list, description="layer names/globs/re: never converted")

    @model_validator(mode="after")
    def _variants_known(self):
        from .ops.registry import list_operators

        known = set(list_operators()) | set(SKIP_VARIANTS)
        for where, v in [("defaults.variant", self.defaults.variant)] + [
            (f"rules.{i}.variant", r.variant) for i, r in enumerate(self.rules)
        ]:
            if v is not None and v not in known:
                raise ValueError(f"{where}: unknown variant {v!r}; known variants: {', '.join(sorted(known))}")
        return self


# ---------------------------------------------------------------------------------------------
# loading with line numbers


def _line_map(text: str) -> dict[tuple, int]:
    """Path (tuple of keys/indices) -> 1-based line, from the YAML node tree."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                lines[path + (k.value,)] = k.start_mark.line + 1
                walk(v, path + (k.value,))
                lines[path + (k.value,)] = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


_FIXES = {
    "extra_forbidden": "remove it or check its spelling; allowed fields: {allowed}",
    "missing": "add this field",
    "literal_error": "use one of the allowed values",
    "too_short": "add at least one rule",
}


def _allowed_fields(loc: tuple) -> str:
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            break
        ann = field.annotation
        inner = getattr(ann, "__args__", (ann,))
        sub = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is None and hasattr(ann, "__args__"):
            for a in ann.__args__:
                sub = next(
                    (b for b in getattr(a, "__args__", ()) if isinstance(b, type) and issubclass(b, BaseModel)),
                    None,
                )
                if sub:
                    break
        if sub is None:
            break
        model = sub
    return ", ".join(model.model_fields)


def _format_errors(err: ValidationError, source: str, lines: dict[tuple, int]) -> str:
    out = []
    for e in err.errors():
        loc = tuple(
            p
            for p in e["loc"]
            if not (
                isinstance(p, str)
                and p in ("int", "float", "str", "list[int]", "list[str]", "IntRange", "FloatRange", "literal[...]")
                or (isinstance(p, str) and p.startswith(("literal[", "function-")))
            )
        )
        line = None
        for i in range(len(loc), -1, -1):
            if loc[:i] in lines:
                line = lines[loc[:i]]
                break
        field = ".".join(str(p) for p in loc) or "(top level)"
        fix = _FIXES.get(e["type"], "")
        if "{allowed}" in fix:
            fix = fix.format(allowed=_allowed_fields(loc))
        msg = e["msg"].removeprefix("Value error, ")
        where = f"{source}:{line}" if line else source
        out.append(f"{where}: field '{field}': {msg}" + (f" (fix: {fix})" if fix else ""))
    # pydantic reports each member of a union; keep distinct lines only
    return "\n".join(dict.fromkeys(out))


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Parse YAML text into a validated Recipe; RecipeError names the source, line and field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise RecipeError(f"{where}: invalid YAML: {getattr(e, 'problem', e)} (fix the syntax at that line)") from None
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}: a recipe must be a YAML mapping with version, rules, ... (got {type(data).__name__})"
        )
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError("invalid recipe\n" + _format_errors(e, source, _line_map(text))) from None


def load_recipe(recipe: str | os.PathLike | dict | Recipe) -> Recipe:
    """A Recipe from a path, a shipped recipe name (e.g. ``"default"``), YAML text, a dict or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        try:
            return Recipe.model_validate(recipe)
        except ValidationError as e:
            raise RecipeError("invalid recipe\n" + _format_errors(e, "<dict>", {})) from None
    s = os.fspath(recipe)
    path = Path(s)
    if path.is_file():
        return parse_recipe(path.read_text(), str(path))
    shipped = shipped_recipe_path(s)
    if shipped is not None:
        return parse_recipe(shipped.read_text(), str(shipped))
    if "\n" in s or ":" in s and not s.endswith((".yaml", ".yml")):
        return parse_recipe(s)
    names = ", ".join(list_shipped_recipes())
    raise RecipeError(f"recipe {s!r} not found: not a file and not a shipped recipe ({names})")


def recipes_dir() -> Path:
    """Where the shipped recipes live (package data)."""
    return Path(__file__).parent / "recipes"


def list_shipped_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def shipped_recipe_path(name: str) -> Path | None:
    stem = Path(name).name.removesuffix(".yaml").removesuffix(".yml")
    p = recipes_dir() / f"{stem}.yaml"
    return p if p.is_file() and (name == stem or name.startswith("recipes/")) else None


def recipe_json_schema() -> dict:
    """JSON Schema of the recipe format."""
    return Recipe.model_json_schema()


# ---------------------------------------------------------------------------------------------
# matching


@functools.lru_cache(maxsize=512)
def _regex(pat: str) -> re.Pattern:
    return re.compile(pat)


def name_matches(pattern: str, name: str) -> bool:
    """Exact, glob, or ``re:`` (full match) pattern against a qualified module name."""
    if pattern.startswith("re:"):
        return _regex(pattern[3:]).fullmatch(name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern == name


def _in(v, spec) -> bool:
    if spec is None:
        return True
    if isinstance(spec, (IntRange, FloatRange)):
        return spec.contains(v)
    return v in _as_list(spec)


def select_matches(sel: Select, info, mro_names: tuple[str, ...]) -> bool:
    """Whether a layer (LayerInfo + its class MRO names/paths) satisfies every field of ``sel``."""
    if sel.type is not None and not any(t in mro_names for t in _as_list(sel.type)):
        return False
    if sel.name is not None and not any(name_matches(p, info.name) for p in _as_list(sel.name)):
        return False
    if sel.kernel is not None and (info.kernel is None or not all(k in _as_list(sel.kernel) for k in info.kernel)):
        return False
    if sel.stride is not None and (info.stride is None or not all(s in _as_list(sel.stride) for s in info.stride)):
        return False
    if sel.dilation is not None and (
        info.dilation is None or not all(d in _as_list(sel.dilation) for d in info.dilation)
    ):
        return False
    if sel.groups is not None:
        g = info.groups
        if g is None:
            return False
        if sel.groups == "dense" and g != 1:
            return False
        if sel.groups == "depthwise" and not (g > 1 and g == info.in_channels == info.out_channels):
            return False
        if sel.groups == "grouped" and not (g > 1 and g != info.in_channels):
            return False
        if isinstance(sel.groups, int) and g != sel.groups:
            return False
    if not _in(info.in_channels, sel.in_channels) or not _in(info.out_channels, sel.out_channels):
        return False
    if sel.spatial is not None and not _in(info.spatial[0] if info.spatial else None, sel.spatial):
        return False
    if not _in(info.stage, sel.stage) or not _in(info.depth, sel.depth):
        return False
    return True


def closest_names(pattern: str, names: list[str], n: int = 5) -> list[str]:
    """Names most similar to a pattern (for 'rule matches nothing' errors)."""
    core = pattern[3:] if pattern.startswith("re:") else pattern
    core = re.sub(r"[\\^$*?\[\]().+{}|]", "", core)
    return difflib.get_close_matches(core, names, n=n, cutoff=0.3)
