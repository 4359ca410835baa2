"""Memory budgets: bytes (int), a size string ("6GiB", "512MiB", "1.5GB"), or a fraction in (0, 1].

A fraction means that share of all routed experts' bytes; the caller supplies that total.
"""

from __future__ import annotations

import math
import re

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "K": 2**10,
    "M": 2**20,
    "G": 2**30,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")

Budget = int | float | str


def parse_budget(budget: Budget, total_bytes: int, *, name: str = "budget", allow_zero: bool = False) -> int:
    """Bytes meant by `budget`, where a fraction in (0, 1] is a share of `total_bytes`.

    allow_zero: 0 is a valid answer (a host tier that caches nothing).
    """
    if isinstance(budget, bool):
        raise TypeError(f"{name} must be bytes, a size string or a fraction, not a bool")
    if isinstance(budget, int):
        if budget == 0 and allow_zero:
            return 0
        if budget <= 0:
            raise ValueError(f"{name} must be positive, got {budget} bytes")
        return budget
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(
                f"{name} = {budget}: a float budget is a fraction of all experts and must lie in (0, 1]; "
                "pass bytes as an int or a size string such as '6GiB'"
            )
        return max(1, int(budget * total_bytes))
    if isinstance(budget, str):
        match = _SIZE.match(budget)
        if not match or match.group(2).upper() not in _UNITS:
            raise ValueError(
                f"{name} = {budget!r} is not a size: use bytes, a size such as '512MiB' or '6GiB', or a fraction such as '0.25'"
            )
        value, unit = float(match.group(1)), match.group(2).upper()
        if unit == "" and value <= 1.0 and "." in match.group(1):
            return parse_budget(value, total_bytes, name=name, allow_zero=allow_zero)
        return parse_budget(int(value * _UNITS[unit]), total_bytes, name=name, allow_zero=allow_zero)
    raise TypeError(f"{name} must be bytes (int), a size string or a fraction (float), got {type(budget).__name__}")


def format_bytes(count: float) -> str:
    """A short human size: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def slots_for_budget(budget: Budget, per_expert: int, total_experts: int, top_k: int) -> int:
    """How many slots of `per_expert` bytes `budget` buys; refuses a budget below one token's top-k experts."""
    total_bytes = per_expert * total_experts
    slots = min(parse_budget(budget, total_bytes) // per_expert, total_experts)
    if slots < top_k:
        minimum = per_expert * top_k
        raise ValueError(
            f"budget {budget!r} holds {slots} experts, fewer than one token's top-k = {top_k}: the minimum is "
            f"{minimum} bytes ({format_bytes(minimum)}), a fraction of {minimum_fraction(minimum, total_bytes)} of all experts"
            + (f"; did you mean 1.0 (all experts) or a size such as {budget}GiB?" if is_bare_number(budget) else "")
        )
    return slots


def minimum_fraction(minimum: int, total_bytes: int) -> str:
    """The smallest fraction, in 4 decimals, that parse_budget turns into at least `minimum` bytes."""
    fraction = math.ceil(minimum / total_bytes * 1e4) / 1e4
    while fraction < 1 and parse_budget(fraction, total_bytes) < minimum:
        fraction = round(fraction + 1e-4, 4)
    return f"{min(fraction, 1.0):.4f}"


def is_bare_number(budget: Budget) -> bool:
    """A small number with no unit (1, '1.5'): bytes by the rules, but likely meant as 1.0 or '1GiB'."""
    if isinstance(budget, str) and budget.strip().replace(".", "", 1).isdigit():
        budget = float(budget)
    return isinstance(budget, (int, float)) and not isinstance(budget, bool) and 1 <= budget < 1024
