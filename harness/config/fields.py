"""From a mapping to a config section: keys, types (YAML lists become tuples, ints floats),
each field's declared `Bound` (factorllm_core/options.py) and path-like strings, every problem
collected as `section.field: message` into one ConfigError."""

from __future__ import annotations

import math
import types
import typing
from dataclasses import fields

from factorllm_core.options import bound_of, type_hints
from factorllm_core.options import short as core_short


def short(value, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters (the harness's messages allow 80)."""
    return core_short(value, limit)


class ConfigError(ValueError):
    """One or more problems in a config; `problems` lists each as 'field: message'."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(
            f"{source}: " + "; ".join(problems)
            if len(problems) == 1
            else f"{source}: {len(problems)} problems:\n  " + "\n  ".join(problems)
        )


def build_section(cls, data, prefix: str):
    """Instantiate a section dataclass from a mapping, checking keys, types and each field's
    declared bound; returns (section or None, problems)."""
    if not isinstance(data, dict):
        return None, [f"{prefix}: must be a mapping, got {short(data)}"]
    known = {f.name: f for f in fields(cls)}
    problems = [
        f"{prefix}.{str(k)[:80]}: unknown key; allowed: {', '.join(known)}"
        for k in sorted(set(data) - set(known), key=str)
    ]
    hints = type_hints(cls)
    values = {}
    for key, value in data.items():
        if key not in known:
            continue
        coerced, ok = coerce(value, hints[key])
        if not ok:
            problems.append(f"{prefix}.{key}: {short(value)} is not {type_name(hints[key])}")
        elif problem := (
            (bound.problem(f"{prefix}.{key}", coerced) if (bound := bound_of(known[key])) else None)
            or path_text_problem(f"{prefix}.{key}", coerced)
        ):
            problems.append(problem)
        else:
            values[key] = coerced
    if problems:
        return None, problems
    return cls(**values), []


def coerce(value, hint):
    """Check `value` against a simple type hint; YAML lists become tuples; ints are floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            coerced, ok = coerce(value, option)
            if ok:
                return coerced, True
        return value, False
    if hint is type(None):
        return value, value is None
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            return value, False
        if args and args[-1] is Ellipsis:
            items = [coerce(v, args[0]) for v in value]
        elif len(args) == len(value):
            items = [coerce(v, a) for v, a in zip(value, args)]
        else:
            return value, False
        return tuple(v for v, _ in items), all(ok for _, ok in items)
    if hint is float:  # finite only: NaN passes every `< 0` check, inf overflows later
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= MAX_NUMBER
        return (float(value), True) if ok and math.isfinite(value) else (value, False)
    if hint is int:
        return value, isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_NUMBER
    return value, isinstance(value, hint)


MAX_NUMBER = 2**53  # larger numbers in a config are typos (and lose precision as floats)
CONTEXT = 131_072  # tokens in one sequence: the longest context of the models this harness takes


def path_text_problem(field: str, value) -> str | None:
    """A string that will become a file or folder path: no NUL or other control characters
    (the OS refuses NUL; the others are typos or pasted binary), at most 4096 characters."""
    if not isinstance(value, str):
        return None
    if len(value) > 4096:
        return f"{field}: a path of {len(value)} characters; at most 4096"
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        return f"{field}: {short(value)} contains the control character {bad!r}; give a plain path or name"
    return None


def type_name(hint) -> str:
    name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
    return {"int": "int", "float": "a finite float"}.get(name, name)
