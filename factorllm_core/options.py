"""Options that define a variant, each declared once, on its config field.

A config field written as `option(...)` carries in its metadata what the rest of the
project needs to know about it: the paper's value, whether it is a grid axis, how a
non-paper value shows in the recipe string, its name among the report's factors,
whether it needs a calibration pass. The grid's axes and their types, the recipe
string, "is this the paper's recipe", the trial-id rule for options added later, the
report's factor list and the calibration error messages are derived from these
declarations (`harness/config.py`), never listed again. The field's type annotation
is the option's type.

    router_init: str = option("random", recipe=True, tag="init={}", added_later=True,
                              calibrated=lambda v: v != "random", calibrated_hint="router_init fit")

Adding an option is one such line (and the code that uses its value).

A plain setting (not a variant's option) is declared the same way with `setting(...)`: its
`Bound` (the values that make physical sense, checked when a config is built) and its
`identity` (whether it is part of the trial id) sit beside its default. `option(...)` takes
a `bound` too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class _NotRecipe:
    """The `paper` value of an option that is no part of the recipe (N, K, the router mode: the
    paper varies them)."""

    def __repr__(self) -> str:
        return "NOT_RECIPE"


NOT_RECIPE: Any = _NotRecipe()
TYPE_WORDS = {int: "an integer", float: "a finite number", str: "a name (a string)", bool: "true or false"}


def short(value, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(x) -> str:
    """A bound or value in a message: integers whole (2147483647), floats short (1e-08)."""
    return str(x) if isinstance(x, int) and abs(x) < 10**12 else f"{x:g}"


@dataclass(frozen=True)
class Bound:
    """The values a number may take; a pair (Adam's betas) is checked element by element.

    unit: the field is a size (tokens, steps, runs): above `high` reads "is above the limit
        of 10,000 measurements", below `low` "must be >= 1". Without a unit the field is a
        physical quantity (a learning rate, a seed): outside reads "is outside [low, high] (why)".
    """

    low: float
    high: float
    unit: str = ""
    why: str = ""
    high_open: bool = False

    def problem(self, field: str, value: Any) -> str | None:
        """Why `value` is outside this bound, as `field: ...`, or None (also for a non-number:
        that is a type problem, reported as one)."""
        values = value if isinstance(value, tuple) else (value,)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return None
        if all(self.low <= v and (v < self.high if self.high_open else v <= self.high) for v in values):
            return None
        if self.unit and not isinstance(value, tuple):
            if value < self.low:
                return f"{field}: {_number(value)} must be >= {_number(self.low)}"
            return f"{field}: {_number(value)} is above the limit of {self.high:,} {self.unit}"
        bounds = f"[{_number(self.low)}, {_number(self.high)}{')' if self.high_open else ']'}"
        shown = ", ".join(_number(v) for v in values)
        shown = f"[{shown}]" if isinstance(value, tuple) else shown
        return f"{field}: {shown} is outside {bounds}" + (f" ({self.why})" if self.why else "")


# How a field counts in the trial id (harness/config/identity.py), in its metadata as `identity`:
ALWAYS = "always"  # part of what is measured
NEVER = "never"  # where it runs or what is kept and reported, not what is measured
UNLESS_DEFAULT = "unless default"  # added later: left out at its default, so older ids still hold
WHERE_EXPERTS_RUN = "where experts run"  # as UNLESS_DEFAULT, and left out of the dense model's id
IDENTITIES = (ALWAYS, NEVER, UNLESS_DEFAULT, WHERE_EXPERTS_RUN)


def setting(
    default: Any = dataclasses.MISSING, *, bound: Bound | None = None, identity: str = ALWAYS, compared: bool = True
) -> Any:
    """A dataclass field that is a plain setting, not a variant's option: its `bound`, its
    `identity` (see IDENTITIES) and whether two trials that differ only in it are compared
    as a one-factor pair in the report (`compared`: False for what changes how often something
    is reported or saved, not what is trained)."""
    if identity not in IDENTITIES:
        raise ValueError(f"identity={identity!r} must be one of {IDENTITIES}")
    metadata = {"bound": bound, "identity": identity, "compared": compared}
    return dataclasses.field(default=default, metadata=metadata)


def bound_of(f: dataclasses.Field) -> Bound | None:
    return f.metadata.get("bound")


def identity_of(f: dataclasses.Field) -> str:
    """A field's trial-id rule: declared by `setting`, or UNLESS_DEFAULT for an option added later."""
    if "identity" in f.metadata:
        return f.metadata["identity"]
    option = f.metadata.get("option")
    return UNLESS_DEFAULT if option is not None and option.added_later else ALWAYS


def compared_of(f: dataclasses.Field) -> bool:
    return f.metadata.get("compared", True)


@dataclass(frozen=True)
class Option:
    paper: Any = NOT_RECIPE  # the paper's value; NOT_RECIPE: the option is a setting, not a recipe choice
    axis: bool = True  # a grid axis, named by the field
    tag: str | None = None  # a non-paper value in the recipe string, e.g. "init={}"; None: not shown there
    factor: str | None = ""  # its name in the report's one-factor comparisons; "" = the field name; None = none
    added_later: bool = False  # left out of the trial id at its paper value, so older trial ids still hold
    calibrated: Callable[[Any], bool] | None = None  # whether a value needs a calibration pass
    calibrated_hint: str = ""  # how the message that asks for calibration tokens names it, e.g. "partition coact"
    choices: Any = None  # a Registry (or a collection) of the allowed values

    def problem(self, name: str, value: Any, kind: type) -> str | None:
        """Why `value` is not a valid value of this option (of type `kind`), or None."""
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            return f"{name}={short(value)} must be {TYPE_WORDS.get(kind, kind.__name__)}"
        if self.choices is None or value in self.choices:
            return None
        allowed = self.choices.names() if hasattr(self.choices, "names") else sorted(self.choices)
        kind = getattr(self.choices, "kind", name)
        return f"{name}={value!r} is not a known {kind}; allowed: {', '.join(map(str, allowed))}"

    @property
    def in_recipe(self) -> bool:
        return self.paper is not NOT_RECIPE


def option(default: Any = dataclasses.MISSING, *, recipe: bool = False, bound: Bound | None = None, **metadata) -> Any:
    """A dataclass field with an `Option` in its metadata; without a default it is required.
    recipe=True: a recipe choice, whose default is the paper's value. bound: as for `setting`."""
    if recipe:
        metadata["paper"] = default
    return dataclasses.field(default=default, metadata={"option": Option(**metadata), "bound": bound})


@dataclass(frozen=True)
class Declared:
    """One declared option of a config class: where it sits and what it says."""

    path: tuple[str, ...]  # where it lands in a trial config, e.g. ("factor", "router_init")
    type: type
    default: Any
    option: Option
    bound: Bound | None = None

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def factor_name(self) -> str | None:
        return self.name if self.option.factor == "" else self.option.factor


def declared(cls, prefix: tuple[str, ...] = ()) -> list[Declared]:
    """The options a config dataclass declares, in declaration order."""
    return list(_declared(cls, prefix))


@functools.cache
def type_hints(cls) -> dict[str, Any]:
    """typing.get_type_hints(cls), once per class (it evaluates every annotation's string each call:
    most of a --dry-run's time before this)."""
    return typing.get_type_hints(cls)


@functools.cache
def _declared(cls, prefix: tuple[str, ...]) -> tuple[Declared, ...]:
    hints = type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "option" in f.metadata:
            default = f.default if f.default is not dataclasses.MISSING else None
            out.append(Declared((*prefix, f.name), hints[f.name], default, f.metadata["option"], bound_of(f)))
    return tuple(out)
