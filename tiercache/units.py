"""Byte sizes: parse "8GiB" / "1.5 GB" / 4096 and print them back."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")

SIZE_FORMS = (
    "an integer number of bytes or a string such as '512MiB', '8GiB', '1.5TB' (B, KiB/MiB/GiB/TiB, KB/MB/GB/TB)"
)


def parse_size(value: object) -> int:
    """Bytes from an int or a string with a binary or decimal unit; raises ValueError saying what is allowed."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is a boolean; expected {SIZE_FORMS}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative; expected {SIZE_FORMS}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is a {type(value).__name__}; expected {SIZE_FORMS}")
    match = _SIZE.match(value)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{value!r} is not a size; expected {SIZE_FORMS}")
    try:
        exact = Decimal(match.group(1)) * _UNITS[match.group(2).lower()]
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only plain decimals
        raise ValueError(f"{value!r} is not a size; expected {SIZE_FORMS}") from exc
    if exact != exact.to_integral_value():
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(exact)


def format_size(nbytes: int) -> str:
    """A short binary-unit rendering: 1536 -> '1.5 KiB'."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}".replace(".0 ", " ")
        value /= 1024
    raise AssertionError("unreachable")
