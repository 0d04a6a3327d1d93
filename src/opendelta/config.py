"""Delta configurations: one dataclass per method, holding only the method's arguments.

Every field is validated here, in one place, whether the config comes from keyword arguments, a
dict or a checkpoint's JSON: the field's annotation gives its type (``bool``, ``int``, ``float``,
``str``, ``list[str]``, ``dict[str, ...]``, each optionally ``| None``) and :func:`size`,
:func:`number`, :func:`positive` and :func:`choice` declare its range or allowed values. A bad
value raises :class:`DeltaConfigError` naming the field, the value and the fix, before any model
is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from opendelta.errors import DeltaConfigError, PatternError
from opendelta.leniency import relax
from opendelta.original_config import OriginalConfigAPI, take_original_fields
from opendelta.registry import RegisteredType

C = TypeVar("C", bound="DeltaConfig")

#: the largest rank, width or token count a config accepts: above every hidden size, context or
#: rank used in practice, so a bigger value is a typo or an overflow and fails before allocating
MAX_SIZE = 65_536
_RULE = "opendelta_rule"  # key of a field's Rule in its dataclass metadata
_KEEP_NONE = object()  # Rule.none_means when None is not replaced
_TYPO = 0.8  # an unknown key this similar to an argument name is a misspelling of it


@dataclass(frozen=True)
class Rule:
    """What a field's value must satisfy beyond its annotated type (declared with size(), number()...)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is excluded
    high_open: bool = False
    choices: Collection[str] | None = None
    none_means: Any = _KEEP_NONE  # a value None stands for (None is then never stored)


def size(default: int | None, *, most: int = MAX_SIZE) -> Any:
    """A field holding a positive whole number of at most `most` (a rank, a width, a token count)."""
    return dataclasses.field(default=default, metadata={_RULE: Rule(low=1, high=most)})


def number(default: float | None, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> Any:
    """A field holding a finite number, optionally bounded (``low_open``/``high_open`` exclude the bound)."""
    return dataclasses.field(default=default, metadata={_RULE: Rule(low, high, low_open, high_open)})


def positive(default: float | None) -> Any:
    """A field holding a finite number greater than zero (a scale, an initialisation range)."""
    return number(default, low=0, low_open=True)


def choice(default: str | bool, choices: Collection[str]) -> Any:
    """A field holding one of `choices` (looked up at validation time, so a registry may grow); a
    field annotated ``bool | str`` holds True, False or one of them (a switch or a named variant)."""
    return dataclasses.field(default=default, metadata={_RULE: Rule(choices=choices)})


@dataclass
class DeltaConfig(OriginalConfigAPI):
    """Arguments every delta method takes; a method's config subclasses it and adds its own."""

    #: the type this config class is registered under (see registry.py)
    delta_type: ClassVar[str] = RegisteredType()

    modified_modules: list[str] | None = None
    exclude_modules: list[str] | None = None
    unfrozen_modules: list[str] | None = None
    #: read modified_modules as common-structure roles; None (the original OpenDelta's default) means False
    common_structure: bool = dataclasses.field(default=False, metadata={_RULE: Rule(none_means=False)})
    #: the dtype of trainable deltas beside a float16/bfloat16 backbone: "float32" or the "weight"'s (precision.py)
    delta_dtype: str = choice("float32", ("float32", "weight"))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any], *, strict: bool | None = None) -> C:
        """Build the config. A key the method does not take that looks like one of its arguments
        (a typo) is an error naming the close ones; other keys (training arguments in a dict the
        original OpenDelta's scripts pass) are dropped with a warning, or refused when `strict`
        (default: :func:`opendelta.leniency.is_strict`). The original's own fields
        (``backbone_class``, ``backend``...) are accepted (see opendelta.original_api)."""
        owner = cls.delta_type or cls.__name__
        if not isinstance(values, Mapping):
            raise DeltaConfigError(
                f"a {owner} configuration must be a mapping of argument names to values, got "
                f"{_shown(values)}; pass a dict such as {{'modified_modules': None}}."
            )
        values = dict(values)
        given_type = values.pop("delta_type", cls.delta_type)
        if cls.delta_type and given_type != cls.delta_type:
            raise DeltaConfigError(f"{cls.__name__} is for delta_type {cls.delta_type!r}, got {given_type!r}")
        original = take_original_fields(cls, values)
        names = cls.field_names()
        for key in list(values):
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=3)
                hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
                error = DeltaConfigError(f"{owner} takes no argument {key!r}.{hint} It takes: {', '.join(names)}.")
                if difflib.get_close_matches(str(key), names, n=1, cutoff=_TYPO):
                    raise error  # a misspelt argument would silently build a different delta
                relax(error, strict)
                del values[key]
        try:
            config = cls(**values)
            for key, value in original.items():
                setattr(config, key, value)
            return config
        except DeltaConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise DeltaConfigError(f"invalid {owner} configuration: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return {"delta_type": self.delta_type, **dataclasses.asdict(self)}

    def __setattr__(self, name: str, value: Any) -> None:
        # every assignment is checked, in __init__ and after it, so a config never holds a bad value
        declared = _annotated_fields(type(self)).get(name)
        if declared is not None:
            f, kind = declared
            value = _checked(self.delta_type or type(self).__name__, name, value, kind, f.metadata.get(_RULE, Rule()), f)
        super().__setattr__(name, value)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks that involve several fields (each field alone is checked from its declaration);
        raise DeltaConfigError naming the bad ones."""

    def check_below(self, name: str, limit: int, limit_name: str) -> None:
        """Raise DeltaConfigError unless the field `name` is below `limit`, a bound the backbone sets
        (checked when a method builds on a backbone, since the config alone cannot know it)."""
        value = getattr(self, name)
        if value >= limit:
            raise DeltaConfigError(
                f"{self.delta_type or type(self).__name__} argument {name}={value} must be below the backbone's "
                f"{limit_name}={limit}; choose {name} < {limit}."
            )


def is_finite_number(value: Any) -> bool:
    """Whether `value` is a finite int or float (a bool is not a number here)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_delta_name(name: object) -> None:
    """Raise DeltaConfigError unless `name` is None (pick a free one) or a Python identifier: the
    delta's name becomes an attribute of every module it modifies."""
    if name is not None and not (isinstance(name, str) and name.isidentifier()):
        raise DeltaConfigError(
            f"the delta's name must be a Python identifier (a str such as 'task_a'), got {_shown(name)}; "
            "pass name='...' or leave it out to get the method's name."
        )


# ------------------------------------------------------------------ the field validators


@functools.cache
def _annotated_fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """Each dataclass field by name, with its resolved annotation (Any where it cannot be resolved)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a user's config may annotate with names its module does not define
        hints = {}
    return {f.name: (f, hints.get(f.name, Any)) for f in dataclasses.fields(cls)}


def _shown(value: object) -> str:
    """`value` for an error message: its repr (shortened) and its type."""
    if value is None:
        return "None"
    try:
        text = repr(value)
    except ValueError:  # an int with more digits than Python converts to text
        text = f"<{value.bit_length()}-bit number>" if isinstance(value, int) else "<unprintable>"
    text = text if len(text) <= 80 else f"{text[:60]}...{text[-10:]}"
    return f"{text} of type {type(value).__name__}"


def check_name_list(value: object, what: str, name: str = "") -> None:
    """Refuse a single string where a list of module names belongs: iterating ``"query"`` would
    address the modules named q, u, e, r and y. The one check for config fields and direct calls."""
    if isinstance(value, str):
        raise PatternError(f"{what} must be a list of names, not a single string, got {_shown(value)}; "
                           f"write {name + '=' if name else ''}[{value!r}].")


def _checked(owner: str, name: str, value: Any, kind: Any, rule: Rule, f: dataclasses.Field | None = None) -> Any:
    """`value` as the field `name` (annotated `kind`) stores it; DeltaConfigError naming the field,
    the value and the fix when it does not fit the annotation or `rule`."""
    optional = False
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        optional = len(args) < len(typing.get_args(kind))
        if len(args) == 1:
            kind = args[0]
        elif set(args) == {bool, str}:  # a switch or a named variant: checked as either
            kind = bool if isinstance(value, bool) else str
        else:
            kind = Any  # a union of other types: no type check
    if value is None:
        if rule.none_means is not _KEEP_NONE:
            return rule.none_means
        if optional or kind is Any:
            return None
    origin = typing.get_origin(kind) or kind

    def fail(expected: str, fix: str = "") -> DeltaConfigError:
        if not fix and f is not None and f.default not in (dataclasses.MISSING, None):
            fix = f"e.g. {name}={f.default!r} (the default)"
        end = "" if fix.endswith("?") else "."
        return DeltaConfigError(f"{owner} argument {name} must be {expected}, got {_shown(value)}"
                                + (f"; {fix}{end}" if fix else "."))

    if kind is bool:
        if not isinstance(value, bool):
            raise fail("True or False" + (" (or None)" if optional else ""),
                       f"write {name}=True or {name}=False (a bool: strings and numbers are not read as truth values)")
        return value
    if kind in (int, float):
        return _checked_number(name, value, kind, rule, fail)
    if kind is str:
        if not isinstance(value, str):
            raise fail("a string" + (f", one of {', '.join(map(repr, rule.choices))}" if rule.choices else ""))
        if rule.choices is not None and value not in rule.choices:
            close = difflib.get_close_matches(value, list(rule.choices), n=1)
            raise fail(f"one of {', '.join(map(repr, rule.choices))}",
                       f"did you mean {close[0]!r}?" if close else "")
        return value
    if origin in (list, tuple, Sequence, Collection):
        (item,) = typing.get_args(kind)[:1] or (Any,)
        check_name_list(value, f"{owner} argument {name}", name)
        if not isinstance(value, (list, tuple)):
            raise fail("a list of names (strings)", f"write {name}=[...]")
        if item is str and not all(isinstance(v, str) for v in value):
            i, bad = next((i, v) for i, v in enumerate(value) if not isinstance(v, str))
            raise fail("a list of names (strings)", f"item {i} is {_shown(bad)}; write every name as a string, "
                                                    "e.g. ['encoder.layer.0.output.dense']")
        return [_checked(owner, f"{name}[{i}]", v, item, rule) for i, v in enumerate(value)]
    if origin in (dict, Mapping):
        key_kind, item = typing.get_args(kind) or (Any, Any)
        if not isinstance(value, Mapping):
            raise fail("a dict {module pattern: value}", f"write {name}={{'pattern': ...}}")
        return {_checked(owner, f"{name} key {k!r}", k, key_kind, Rule()): _checked(owner, f"{name}[{k!r}]", v, item, rule)
                for k, v in value.items()}
    if isinstance(kind, type) and kind is not Any and not isinstance(value, kind):
        raise fail(f"a {kind.__name__}")
    return value


def _checked_number(
    name: str, value: Any, kind: type, rule: Rule, fail: Callable[..., DeltaConfigError]
) -> int | float:
    """A finite number for a float field, a whole number for an int field (8.0 is read as 8; 8.7
    is refused, never truncated), within the rule's bounds."""
    whole = kind is int
    expected = "a whole number" if whole else "a finite number"
    low = rule.low if rule.low is None or not whole else int(rule.low) + (1 if rule.low_open else 0)
    if rule.low is not None and rule.high is not None:
        if whole:
            expected += f" from {low} to {int(rule.high)}"
        else:
            expected += f" in {'(' if rule.low_open else '['}{rule.low}, {rule.high}{')' if rule.high_open else ']'}"
    elif rule.low is not None:
        expected += f" {'>' if rule.low_open and not whole else '>='} {low if whole else rule.low}"
    elif rule.high is not None:
        expected += f" {'<' if rule.high_open else '<='} {rule.high}"
    if isinstance(value, str):
        try:
            parsed = float(value)
        except ValueError:
            raise fail(expected) from None
        shown = int(parsed) if parsed.is_integer() else parsed
        raise fail(expected, f"write {name}={shown!r} (a number, not a string)" if math.isfinite(parsed) else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise fail(expected)
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float: a float field could not compute with it
        finite = whole
    if not finite:
        raise fail(expected, "NaN, infinity and numbers beyond a float's range are not accepted")
    if whole:
        if not isinstance(value, numbers.Integral):
            if not float(value).is_integer():
                raise fail(expected, "it is not truncated: pass the whole number you mean")
        value = int(value)
    elif not isinstance(value, int):
        value = float(value)  # a numpy or torch scalar becomes a float JSON can write
    too_low = rule.low is not None and (value <= rule.low if rule.low_open else value < rule.low)
    too_high = rule.high is not None and (value >= rule.high if rule.high_open else value > rule.high)
    if too_high and whole and rule.high == MAX_SIZE:
        raise fail(expected, "sizes above opendelta.config.MAX_SIZE are refused before anything is allocated")
    if too_low or too_high:
        raise fail(expected)
    return value
