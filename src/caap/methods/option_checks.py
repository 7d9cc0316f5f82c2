"""Validation of method options: a clear ValueError naming `method.<key>`, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def check_choice(key: str, value: Any, allowed: Sequence[Any]) -> Any:
    """`value` if it is one of `allowed`, else a ValueError naming `method.<key>`, the value and the choices."""
    if value not in allowed:
        raise ValueError(f"method.{key}={value!r} is not supported; allowed: {list(allowed)}")
    return value


def check_positive_int(key: str, value: Any) -> int:
    """`value` if it is an integer >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"method.{key}={value!r} must be an integer >= 1")
    return value


def check_probability(key: str, value: Any, open_interval: bool = True) -> float:
    """`value` as a float if it lies in (0, 1) (or [0, 1) with `open_interval=False`)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (0.0 < value < 1.0 if open_interval else 0.0 <= value < 1.0)
    if not ok:
        interval = "(0, 1)" if open_interval else "[0, 1)"
        raise ValueError(f"method.{key}={value!r} must be a number in {interval}")
    return float(value)


def check_fraction(key: str, value: Any) -> float:
    """`value` as a float if it lies in [0, 1] (a share of patches or windows: 0 = none, 1 = all)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
    if not ok:
        raise ValueError(f"method.{key}={value!r} must be a number in [0, 1]")
    return float(value)
