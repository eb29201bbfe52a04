"""Recipes: YAML files that say which layers become which partial operator.

Validated with pydantic; every error names the file, line, field and the fix. When several rules
match a layer, :func:`resolve` decides (torch.ao's precedence: defaults < rules selecting by
type/predicates only < rules with a glob or ``re:`` name < rules with an exact name; among equals,
file order): the most specific rule that names a variant decides the variant, and only the ratio
and params given for that variant apply. See docs/recipes.md, "Precedence".
"""

from __future__ import annotations

import ast
import difflib
import fnmatch
import functools
import inspect
import os
import re
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from .errors import RecipeError
from .ops.registry import _OPERATORS, get_operator, list_operators

RATIO_WORDS = ("dynamic", "adaptive", "inherit")
SKIP_VARIANTS = ("skip", "none")

MAX_DEPTH = 32  # nesting levels of a recipe document (a real recipe uses about 6)
MAX_NODES = 50_000  # YAML values after alias expansion (shipped recipes: < 200)


def check_ratio(v: Any) -> Any:
    """A ratio is a number in (0, 1] or one of RATIO_WORDS; ValueError (with the fix) otherwise."""
    if isinstance(v, str) and v in RATIO_WORDS:
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < float(v) <= 1:  # NaN fails too
        return float(v)
    raise ValueError(
        f"ratio must be in (0, 1] (a number: the share of channels that keep the expensive op, e.g. 0.25; "
        "for partial_attention the share given the cheap mixer) "
        f"or one of {', '.join(RATIO_WORDS)}; got {v!r}"
    )


Ratio = Annotated[float | Literal["dynamic", "adaptive", "inherit"], BeforeValidator(check_ratio)]


def _known_variant(v: str | None) -> str | None:

    known = set(list_operators()) | set(SKIP_VARIANTS)
    if v is not None and v not in known:
        close = difflib.get_close_matches(v, sorted(known), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown variant {v!r}; {hint}known variants: {', '.join(sorted(known))}")
    return v


def _regex_ok(pat: str) -> str:
    if pat.startswith("re:"):
        try:
            re.compile(pat[3:])
        except re.error as e:
            raise ValueError(
                f"bad regular expression {pat[3:]!r}: {e} (fix the pattern, or drop the re: prefix)"
            ) from None
    return pat


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
    pointwise: bool | None = Field(None, description="true: a 1x1 conv; false: a conv with a spatial kernel")
    keeps_shape: bool | None = Field(
        None, description="true: the layer's output has its input's shape (in == out channels, stride 1); false: not"
    )
    spatial: int | IntRange | None = Field(None, description="input height of the layer (feature maps)")
    stage: int | list[int] | None = Field(None, description="log2(input/feature size) - 1: 1..4 in a classifier")
    depth: FloatRange | None = Field(None, description="relative position in the forward pass, 0..1")

    @field_validator("name")
    @classmethod
    def _regex_compiles(cls, v):
        for pat in _as_list(v) if v is not None else []:
            _regex_ok(pat)
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
    variant: Annotated[str | None, AfterValidator(_known_variant)] = None
    ratio: Ratio | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    note: str | None = None

    @field_validator("params")
    @classmethod
    def _params_known(cls, v: dict, info: ValidationInfo) -> dict:
        if "variant" not in info.data:  # the variant itself is invalid (reported on its own)
            return v
        ratio = info.data.get("ratio")
        if ratio is None:  # the defaults' ratio applies (a word there can change the operator)
            ratio = (info.context or {}).get("defaults_ratio")
        problems = param_problems(info.data.get("variant"), v, ratio)
        if problems:
            raise ValueError("; ".join(problems))
        return v


class Defaults(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: Annotated[str, AfterValidator(_known_variant)] = "pconv"
    ratio: Ratio = 0.25
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("params")
    @classmethod
    def _params_known(cls, v: dict, info: ValidationInfo) -> dict:
        if "variant" not in info.data:  # the variant itself is invalid (reported on its own)
            return v
        ratio = info.data.get("ratio")
        if ratio is None:  # the defaults' ratio applies (a word there can change the operator)
            ratio = (info.context or {}).get("defaults_ratio")
        problems = param_problems(info.data.get("variant"), v, ratio)
        if problems:
            raise ValueError("; ".join(problems))
        return v


class Recipe(BaseModel):
    """A conversion recipe (see docs/recipes.md)."""

    model_config = ConfigDict(extra="forbid")
    version: Literal[1] = Field(description="recipe format version; 1")
    name: str | None = None
    description: str | None = None
    strict: bool = Field(True, description="a rule that matches no layer is an error")
    input_size: int | None = Field(None, gt=0, description="example input size for discovery (default: model's)")
    defaults: Defaults = Field(default_factory=Defaults)
    rules: list[Rule] = Field(min_length=1)
    ignore: list[Annotated[str, AfterValidator(_regex_ok)]] = Field(
        default_factory=list, description="layer names/globs/re: never converted"
    )

    @classmethod
    def model_validate(cls, obj: Any, *args, **kwargs) -> Recipe:
        """Validate a dict; a RecipeError listing every problem (not pydantic's ValidationError)."""
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as e:
            raise RecipeError(_format_errors(e, "<recipe>", {})) from None


# ---------------------------------------------------------------------------------------------
# operator parameters


def _hint_text(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _bound_by_from_module(cls: type) -> tuple[int, set[str]] | None:
    """How ``from_module`` calls the constructor (``cls(a, b, k=...)``): the number of positional
    arguments and the keywords it passes itself; a recipe cannot give those. None if unknown."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.from_module)))
    except (OSError, TypeError, SyntaxError):
        return None
    calls = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("cls", cls.__name__)
    ]
    if len(calls) != 1:
        return None
    call = calls[0]
    return len(call.args), {k.arg for k in call.keywords if k.arg is not None}


@functools.cache
def operator_parameters(cls: type) -> tuple[frozenset[str] | None, dict[str, Any], dict[str, tuple]]:
    """What a recipe may pass an operator in ``params``: the names (None: any), their type hints and
    the allowed values of enumerated ones (the class's ``PARAM_CHOICES``).

    Names come from ``from_module``'s signature; where it takes ``**kwargs`` they go on to the class
    constructor, whose parameters count too (less those ``from_module`` passes itself), and a
    constructor with ``**kwargs`` of its own lists what they accept in ``EXTRA_PARAMS`` (else any
    name is taken).
    """
    choices = {k: tuple(v) for k, v in getattr(cls, "PARAM_CHOICES", {}).items()}
    names: set[str] = set(choices)
    hints: dict[str, Any] = {}
    open_ = False
    for fn in (cls.from_module, cls.__init__):
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return None, {}, choices
        params = list(sig.parameters.values())[1:]  # the module to convert / self
        if fn is cls.__init__:
            bound = _bound_by_from_module(cls)
            if bound is None:  # unknown: at least leave out what has no default (always passed)
                params = [p for p in params if p.default is not p.empty or p.kind is p.VAR_KEYWORD]
            else:
                n, keywords = bound
                params = [
                    p for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD or (i >= n and p.name not in keywords)
                ]
        names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        try:
            found = typing.get_type_hints(fn)
        except Exception:  # unresolvable annotations: no type checks, names still checked
            found = {}
        for p in params:
            if p.name in found and p.name not in hints:
                hints[p.name] = found[p.name]
        open_ = any(p.kind is p.VAR_KEYWORD for p in params)
        if not open_:
            break
    if open_:
        extra = getattr(cls, "EXTRA_PARAMS", None)
        if extra is None:
            return None, hints, choices
        names |= set(extra)
    return frozenset(names), hints, choices


def _tuplify(v: Any) -> Any:
    return tuple(_tuplify(x) for x in v) if isinstance(v, list) else v


def cycle_values(value: Any) -> list | None:
    """The values of a ``{cycle: [a, b, ...]}`` parameter, given in turn to the layers the rule selects
    (definition order: a, b, a, b..., a layer the operator then refuses included; the plan records each
    converted layer's own value), else None."""
    if isinstance(value, dict) and set(value) == {"cycle"}:
        return value["cycle"] if isinstance(value["cycle"], list) else []
    return None


def _value_problem(name: str, value: Any, hints: dict, choices: dict) -> str | None:
    """Why ``value`` is not a valid ``name`` (None when it is)."""
    cycle = cycle_values(value)
    if cycle is not None:
        if not cycle:
            return f"{value!r}: cycle takes a non-empty list of values"
        if any(cycle_values(v) is not None for v in cycle):
            return f"{value!r}: a cycle's values cannot be cycles"
        return next((p for p in (_value_problem(name, v, hints, choices) for v in cycle) if p), None)
    if name in choices and value not in choices[name]:
        return f"{value!r} is not one of {', '.join(map(str, choices[name]))}"
    hint = hints.get(name)
    if hint is None or hint is Any:
        return None
    try:
        adapter = TypeAdapter(hint)
    except Exception:  # a hint pydantic cannot build a validator for: not checked here
        return None
    for candidate in (value, _tuplify(value)):  # YAML has lists where signatures say tuple
        try:
            adapter.validate_python(candidate, strict=True)
            return None
        except ValidationError:
            continue
        except Exception:
            return None
    return f"{value!r} is not a valid {_hint_text(hint)}"


def _candidate_variants(variant: str, ratio: Any) -> list[str]:
    """The operators a rule's params may end up with: its variant, and the one a ratio word implies
    (the operator's ``ratio_words``)."""
    cls = _OPERATORS.get(variant)
    if isinstance(ratio, str) and cls is not None and ratio in cls.ratio_words:
        implied = cls.ratio_words[ratio][0]
        if implied != variant:
            return [variant, implied]
    return [variant]


def param_problems(variant: str | None, params: dict, ratio: Any = None) -> list[str]:
    """Every problem with ``params`` for ``variant`` at ``ratio`` (variant None: checked against every
    operator taking each name), e.g. ``params.attn: 'nope' is not one of ch, sf (variant 'patconv')``."""
    if not params or variant in SKIP_VARIANTS:
        return []
    if variant is not None:
        cands = [v for v in _candidate_variants(variant, ratio) if v in _OPERATORS]
        if not cands:
            return []
        sigs = {v: operator_parameters(_OPERATORS[v]) for v in cands}
        out = []
        for name, value in params.items():
            takers = [v for v, (names, _, _) in sigs.items() if names is None or name in names]
            if not takers:
                names = sorted(set().union(*(s[0] for s in sigs.values())) - {"ratio"})
                close = difflib.get_close_matches(name, names, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                out.append(
                    f"params.{name}: variant {variant!r} has no parameter {name!r}; {hint}it takes {', '.join(names)}"
                )
                continue
            why = [_value_problem(name, value, sigs[v][1], sigs[v][2]) for v in takers]
            if all(why):
                out.append(f"params.{name}: {why[0]} (variant {variant!r})")
        return out
    # no variant in this rule: it comes from the defaults or another rule; check against every operator
    sigs = {v: operator_parameters(c) for v, c in _OPERATORS.items()}
    out = []
    for name, value in params.items():
        declared = [v for v, (names, _, _) in sigs.items() if names is not None and name in names]
        if not declared:
            if not any(names is None for names, _, _ in sigs.values()):
                out.append(
                    f"params.{name}: no operator takes a parameter {name!r}; check its spelling, or give the "
                    "rule a variant"
                )
            continue
        why = [_value_problem(name, value, sigs[v][1], sigs[v][2]) for v in declared]
        if all(why):
            out.append(f"params.{name}: {why[0]} (for {', '.join(declared)})")
    return out


# ---------------------------------------------------------------------------------------------
# loading with line numbers


class _TooBig(Exception):
    def __init__(self, node, why: str):
        super().__init__(why)
        self.node, self.why = node, why


def _children(node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [n for kv in node.value for n in kv]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root) -> None:
    """Refuse documents that aliases make huge (a "billion laughs" bomb), deep or recursive, before
    anything walks them (sizes and depths are computed once per node, iteratively), and mappings with
    a key given twice (YAML keeps the last one without a word)."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        k = id(node)
        if done:
            if isinstance(node, yaml.MappingNode):
                seen: dict[str, int] = {}
                for key, _ in node.value:
                    if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                        if key.value in seen:
                            raise _TooBig(
                                key,
                                f"key {key.value!r} appears twice in one mapping (also at line {seen[key.value]}); "
                                "YAML would silently keep only the last one: merge them",
                            )
                        seen[key.value] = key.start_mark.line + 1
            kids = _children(node)
            size[k] = 1 + sum(size[id(c)] for c in kids)
            depth[k] = 1 + max((depth[id(c)] for c in kids), default=0)
            on_path.discard(k)
            if size[k] > MAX_NODES:
                raise _TooBig(
                    node,
                    f"its aliases expand to more than {MAX_NODES:,} values (an alias bomb?); write the values "
                    "out or use fewer nested aliases",
                )
            if depth[k] > MAX_DEPTH:
                raise _TooBig(node, f"it is nested more than {MAX_DEPTH} levels deep once aliases are expanded")
            continue
        if k in size:
            continue
        if k in on_path:
            raise _TooBig(node, "an alias here refers to itself (a recursive structure); write the value out")
        on_path.add(k)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in size)


def _check_object(obj: Any) -> None:
    """The checks of :func:`_check_expansion` for a recipe given as Python objects: no container inside
    itself, at most MAX_DEPTH levels and MAX_NODES values (shared containers counted each time)."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()

    def kids(o) -> list:
        if isinstance(o, dict):
            return [v for kv in o.items() for v in kv]
        return list(o) if isinstance(o, (list, tuple, set)) else []

    stack = [(obj, False)]
    while stack:
        o, done = stack.pop()
        k = id(o)
        if done:
            ks = [c for c in kids(o) if isinstance(c, (dict, list, tuple, set))]
            size[k] = 1 + len(kids(o)) + sum(size[id(c)] - 1 for c in ks)
            depth[k] = 1 + max((depth[id(c)] for c in ks), default=0)
            on_path.discard(k)
            if size[k] > MAX_NODES or depth[k] > MAX_DEPTH:
                raise RecipeError(
                    f"recipe: refused: more than {MAX_NODES:,} values or {MAX_DEPTH} levels of nesting (a real "
                    "recipe has a few hundred values, about 6 levels)"
                )
            continue
        if k in size or not isinstance(o, (dict, list, tuple, set)):
            continue
        if k in on_path:
            raise RecipeError("recipe: refused: a dict or list contains itself (a recursive structure)")
        on_path.add(k)
        stack.append((o, True))
        stack.extend((c, False) for c in kids(o) if isinstance(c, (dict, list, tuple, set)) and id(c) not in size)


def _compose(text: str, source: str):
    """The YAML node tree of ``text`` (None for an empty document), checked for nesting depth and
    alias expansion; RecipeError names the line."""
    depth = 0
    try:
        # the event parser is iterative: find a too-deep document before the (recursive) composer does
        for ev in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise RecipeError(
                        f"{source}:{ev.start_mark.line + 1}: the recipe is nested more than {MAX_DEPTH} levels "
                        "deep (a recipe needs about 6): flatten it"
                    )
            elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise RecipeError(f"{where}: invalid YAML: {getattr(e, 'problem', e)} (fix the syntax at that line)") from None
    if root is not None:
        try:
            _check_expansion(root)
        except _TooBig as e:
            raise RecipeError(f"{source}:{e.node.start_mark.line + 1}: refused: {e.why}") from None
    return root


def _line_map(root) -> dict[tuple, int]:
    """Path (tuple of keys/indices) -> 1-based line, from the YAML node tree."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if not isinstance(k, yaml.ScalarNode):
                    continue
                walk(v, path + (k.value,))
                lines[path + (k.value,)] = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))

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


_UNION_TAGS = ("int", "float", "str", "bool", "list[int]", "list[str]", "IntRange", "FloatRange")


def _format_errors(err: ValidationError, source: str, lines: dict[tuple, int]) -> str:
    """Every problem of a recipe, one line each (field, line, message, fix), under a count."""
    by_field: dict[tuple, list[str]] = {}
    for e in err.errors():
        loc = tuple(
            p
            for p in e["loc"]
            if not (isinstance(p, str) and (p in _UNION_TAGS or p.startswith(("literal[", "function-"))))
        )
        fix = _FIXES.get(e["type"], "")
        if "{allowed}" in fix:
            fix = fix.format(allowed=_allowed_fields(loc))
        msg = e["msg"].removeprefix("Value error, ") + (f" (fix: {fix})" if fix else "")
        msgs = by_field.setdefault(loc, [])
        if msg not in msgs:  # pydantic reports each member of a union: keep one line per field
            msgs.append(msg)
    out = []
    for loc, msgs in by_field.items():
        line = next((lines[loc[:i]] for i in range(len(loc), -1, -1) if loc[:i] in lines), None)
        field = ".".join(str(p) for p in loc) or "(top level)"
        where = f"{source}:{line}" if line else source
        out.append((line or 0, f"{where}: field '{field}': {' / '.join(msgs)}"))
    out = [text for _, text in sorted(out, key=lambda t: t[0])]  # file order
    n = len(out)
    return f"invalid recipe {source}: {n} problem{'s' if n != 1 else ''}\n" + "\n".join(out)


def _validate(data: dict, source: str, lines: dict[tuple, int]) -> Recipe:
    defaults = data.get("defaults")
    ctx = {"defaults_ratio": defaults.get("ratio") if isinstance(defaults, dict) else None}
    try:
        return Recipe.__pydantic_validator__.validate_python(data, context=ctx)
    except ValidationError as e:
        raise RecipeError(_format_errors(e, source, lines)) from None


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Parse YAML text into a validated Recipe; RecipeError names the source, line and field of every
    problem. Alias bombs, recursive aliases and documents nested deeper than MAX_DEPTH are refused."""
    root = _compose(text, source)
    loader = yaml.SafeLoader("")
    try:
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise RecipeError(f"{where}: invalid YAML: {getattr(e, 'problem', e)} (fix the value at that line)") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}: a recipe must be a YAML mapping with version, rules, ... (got {type(data).__name__})"
        )
    return _validate(data, source, _line_map(root))


def read_recipe_file(path: str | os.PathLike) -> str:
    """The text of a recipe file: UTF-8 (a BOM is fine); RecipeError naming the file otherwise."""
    path = os.fspath(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path!r}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise RecipeError(
            f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line}, column {col}); "
            "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _is_file(s: str) -> bool:
    try:
        return Path(s).is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte: not a file
        return False


def load_recipe(recipe: str | os.PathLike | dict | Recipe) -> Recipe:
    """A Recipe from a path, a shipped recipe name (e.g. ``"default"``), YAML text, a dict or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        _check_object(recipe)
        return _validate(recipe, "<dict>", {})
    if not isinstance(recipe, (str, os.PathLike)):
        raise RecipeError(
            "a recipe must be a path, a shipped recipe name, YAML text, a dict or a partialize Recipe "
            f"(got {type(recipe).__name__})"
        )
    s = os.fspath(recipe)
    if not isinstance(s, str):
        raise RecipeError(f"a recipe must be a path, a shipped recipe name, YAML text, a dict or a Recipe (got {s!r})")
    if "\n" in s and not isinstance(recipe, os.PathLike):  # YAML text: never a file name
        return parse_recipe(s)
    if _is_file(s):
        return parse_recipe(read_recipe_file(s), s)
    if os.path.isdir(s):
        raise RecipeError(f"recipe {s!r} is a directory; give a recipe file (.yaml) in it")
    shipped = shipped_recipe_path(s)
    if shipped is not None:
        return parse_recipe(read_recipe_file(shipped), str(shipped))
    if not isinstance(recipe, os.PathLike) and ":" in s and not s.endswith((".yaml", ".yml")):
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
    if sel.pointwise is not None and (info.kernel is None or all(k == 1 for k in info.kernel) != sel.pointwise):
        return False
    if sel.keeps_shape is not None and (info.in_shape is None or (info.in_shape == info.out_shape) != sel.keeps_shape):
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


# ---------------------------------------------------------------------------------------------
# resolution: what the rules decide for one layer


@dataclass(frozen=True)
class Decision:
    """What a recipe says for one layer: the variant (after ratio words), its ratio and params, every
    matching rule (lowest precedence first) and the rule that chose the variant (None: defaults)."""

    variant: str
    ratio: float | str | None
    params: dict
    rules: tuple[int, ...]
    variant_rule: int | None

    def rules_text(self) -> str:
        return ", ".join(f"rules[{i}]" for i in self.rules)


def resolve(recipe: Recipe, info, mro_names: tuple[str, ...]) -> Decision | None:
    """The decision for a layer (LayerInfo + its class MRO names), or None when no rule matches it.

    Precedence (docs/recipes.md): matching rules are ordered defaults < type/predicates < glob/regex
    name < exact name, file order among equals. The most specific rule that names a ``variant`` decides
    it. ``ratio`` and ``params`` then come only from the defaults and rules that are *for that variant*
    (a rule without a ``variant`` is for the defaults' variant): a more specific rule overrides the
    fields it sets, ``params`` key by key. A ``params: {attn: sf}`` meant for PATConv therefore never
    reaches a layer another rule turns into PConv.
    """
    matches = sorted(
        (1 + r.select.name_kind(), i) for i, r in enumerate(recipe.rules) if select_matches(r.select, info, mro_names)
    )
    if not matches:
        return None
    order = [i for _, i in matches]
    base = recipe.defaults.variant
    variant, chooser = base, None
    for i in order:
        if recipe.rules[i].variant is not None:
            variant, chooser = recipe.rules[i].variant, i
    ratio = recipe.defaults.ratio
    params = dict(recipe.defaults.params) if variant == base else {}
    for i in order:
        r = recipe.rules[i]
        if (r.variant or base) != variant:
            continue
        if r.ratio is not None:
            ratio = r.ratio
        params.update(r.params)
    return Decision(variant, ratio, params, tuple(order), chooser)


def apply_ratio_word(decision: Decision, layer: str) -> Decision:
    """A ratio word (``dynamic``, ``adaptive``, ``inherit``) turns the variant into the operator its
    ``ratio_words`` name, with the parameters it implies; RecipeError naming the layer and the rule
    when the variant does not take the word."""
    ratio = decision.ratio
    if not isinstance(ratio, str) or decision.variant in SKIP_VARIANTS:
        return decision
    words = get_operator(decision.variant).ratio_words
    if ratio not in words:
        takers = [n for n in list_operators() if ratio in get_operator(n).ratio_words]
        where = f"rules[{decision.variant_rule}]" if decision.variant_rule is not None else "defaults"
        raise RecipeError(
            f"layer {layer!r}: ratio {ratio!r} does not apply to variant {decision.variant!r} (chosen by {where}; "
            f"the word applies to {', '.join(takers) or 'no registered operator'}); give a number in (0, 1]"
        )
    variant, implied = words[ratio]
    return Decision(variant, ratio, implied | decision.params, decision.rules, decision.variant_rule)
