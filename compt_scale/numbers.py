"""Numbers as users write them: in a chain spec, a `grow_to:` mapping, or `grow --set FIELD=VALUE`.

YAML 1.1 (PyYAML) reads `2e9`, `2.0e9` and `1.5e10` as strings (its floats need a '.' and a signed
exponent), while users write them for token budgets, and `1_000_000` and `.5` for sizes and ratios. An
integer field takes any of these forms when the value is a whole number (`2.0e9` -> 2000000000, exact:
strings go through Decimal, never a rounded float); `2.5` or `'abc'` for it stay a one-line CompTError
naming the field. Every coercion below is shared by config.py (spec fields) and grow/targets.py
(config overrides), so both read numbers the same way.
"""
from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Any

from .errors import CompTError

# Integer fields end up in torch/numpy int64 (token counts, steps, sizes).
INT_LIMIT = 2**63 - 1
# YAML's decimal forms: digits with '_' separators, an optional fraction (or a bare '.5'), an optional
# exponent with or without a sign. Hex/octal/sexagesimal forms are already ints when YAML hands them over.
_DECIMAL = re.compile(r"[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][-+]?\d+)?")


def parse_decimal(text: str) -> Decimal | None:
    """'2.0e9', '1_000_000', '.5', '+3e-4' -> the exact Decimal; anything else (words, 'nan', '') -> None."""
    s = text.strip()
    if not _DECIMAL.fullmatch(s):
        return None
    try:
        return Decimal(s.replace("_", ""))
    except InvalidOperation:
        return None


def as_int(value: Any, where: str) -> int:
    """An integer field: an int, a whole float (2e9 as YAML gives it), or a whole decimal string."""
    if isinstance(value, str):
        exact = parse_decimal(value)
        whole = exact is not None and abs(exact) <= INT_LIMIT and exact == exact.to_integral_value()
        if exact is None or not whole:
            raise CompTError(f"{where}: expected an integer, got {value!r}")
        return int(exact)
    # .inf/.nan are YAML floats: int() of them raises (or would truncate), so check finiteness first.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or float(value) != int(value):
        raise CompTError(f"{where}: expected an integer, got {value!r}")
    if abs(int(value)) > INT_LIMIT:
        raise CompTError(f"{where}: {value!r} is out of range (at most {INT_LIMIT})")
    return int(value)


def as_float(value: Any, where: str) -> float:
    """A real-valued field: an int, a float, or a decimal string ('3e-4', '2.0e9', '1_000.5'); finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # also 'inf'/'nan' strings, so the message below says "finite"
        except (TypeError, ValueError):
            raise CompTError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(value):  # a NaN compares false with every bound check downstream
        raise CompTError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def as_number(value: Any) -> Any:
    """A decimal string as the number it spells (int when whole and written without '.'/exponent,
    else float); any other value unchanged. For fields whose type is not known."""
    if isinstance(value, str) and (exact := parse_decimal(value)) is not None:
        plain = re.fullmatch(r"[-+]?[\d_]+", value.strip()) is not None
        return int(exact) if plain else float(exact)
    return value


def like(value: Any, reference: Any, where: str, integer: bool = False) -> Any:
    """`value` coerced to the type of `reference` (a config field's current value): a whole number for an
    int field (or when `integer`), a finite number for a float field, true/false for a bool field.
    A field with no typed reference (None, a string, a list) gets its numbers read (as_number)."""
    if integer or (isinstance(reference, int) and not isinstance(reference, bool)):
        return as_int(value, where)
    if isinstance(reference, bool):
        if not isinstance(value, bool):
            raise CompTError(f"{where}: expected true/false, got {value!r}")
        return value
    if isinstance(reference, float):
        return as_float(value, where)
    return as_number(value)
