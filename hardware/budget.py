"""Budgets: ``--budget latency=4ms,size=500KB,bitops=1G,params=1M,accuracy_drop=1%``.

Any subset of the five constraints, comma-separated ``KEY=VALUE``. Units:

- ``latency``: ``us`` (or ``µs``), ``ms``, ``s``; a unit is required.
- ``size``: ``B``, decimal ``KB``/``MB``/``GB`` (1 KB = 1000 B) and binary ``KiB``/``MiB``/``GiB``
  (1 KiB = 1024 B); a unit is required. ``B`` means bytes, never bits.
- ``bitops`` and ``params``: a plain count with an optional ``K`` (10³), ``M`` (10⁶), ``G`` (10⁹)
  or ``T`` (10¹²) suffix.
- ``accuracy_drop``: percentage points of top-1 test accuracy, written with ``%``
  (``1%``: the exported model may be at most one point less accurate than the model given).

Every malformed entry raises :class:`~ir.errors.BadInputError` with a one-line message.

A pass may add a limit of its own (:meth:`Budget.with_limit`): ``quantize.latency_ratio=1.5``
resolves to an absolute latency on the target and becomes a constraint like ``--budget``'s,
checked by the hardware pass on the exported file. Where two sources limit one key, the
tighter wins, and each checked :class:`Constraint` names its source and every candidate.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from fxsculpt.ir.errors import BadInputError

LATENCY_UNITS = {"us": 1e-3, "µs": 1e-3, "μs": 1e-3, "ms": 1.0, "s": 1000.0}  # → milliseconds
SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
COUNT_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}

#: Budget keys, the unit their limit is kept in, and how a value is spelled.
KEYS = {
    "latency": ("ms", "a time such as 4ms, 500us or 0.01s"),
    "size": ("bytes", "a size such as 500KB, 2MiB or 1000000B"),
    "bitops": ("bitops", "a count such as 1G, 250M or 5e8"),
    "params": ("params", "a count such as 1M, 300K or 250000"),
    "accuracy_drop": ("fraction", "a percentage such as 1% or 0.5%"),
}

_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-zµμ%]*)\s*$")


#: The source of a limit written in ``--budget``.
CLI_SOURCE = "--budget"


@dataclass(frozen=True)
class Limit:
    """One candidate limit of a budget key and where it came from.

    ``source`` is ``"--budget"`` or the option that produced it (``"quantize.latency_ratio=1.5"``);
    ``detail`` says how a derived limit was resolved (``"1.5 x uniform 8-bit 0.41 ms, measured"``).
    """

    value: float
    source: str = CLI_SOURCE
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"limit": self.value, "source": self.source}
        if self.detail:
            out["detail"] = self.detail
        return out


@dataclass(frozen=True)
class Constraint:
    """One checked budget entry: its limit, what was measured, whether it was met, and the source
    of the limit (the tightest of ``candidates`` when several sources limit the same key)."""

    name: str
    limit: float
    measured: float | None
    met: bool
    unit: str
    source: str = CLI_SOURCE
    candidates: tuple[Limit, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "limit": self.limit,
            "measured": self.measured,
            "met": self.met,
            "unit": self.unit,
            "source": self.source,
        }
        if len(self.candidates) > 1 or any(c.detail for c in self.candidates):
            out["candidates"] = [c.as_dict() for c in self.candidates]
        return out


@dataclass
class Budget:
    """Upper limits; ``None`` means unconstrained. Latency in ms, size in bytes, drop as a fraction."""

    latency_ms: float | None = None
    size_bytes: float | None = None
    bitops: float | None = None
    params: float | None = None
    accuracy_drop: float | None = None
    text: str = ""
    #: Limits added by passes (:meth:`with_limit`), by budget key; the fields above are ``--budget``'s.
    derived: dict[str, tuple[Limit, ...]] = field(default_factory=dict)

    def given(self) -> dict[str, float]:
        """The limits written in ``--budget``, by budget key."""
        values = {
            "latency": self.latency_ms,
            "size": self.size_bytes,
            "bitops": self.bitops,
            "params": self.params,
            "accuracy_drop": self.accuracy_drop,
        }
        return {k: v for k, v in values.items() if v is not None}

    def candidates(self, key: str) -> list[Limit]:
        """Every limit on ``key``: ``--budget``'s first, then those passes added."""
        given = self.given()
        out = [Limit(given[key])] if key in given else []
        return out + list(self.derived.get(key, ()))

    def limits(self) -> dict[str, float]:
        """The effective constraints, by budget key: the tightest candidate of each."""
        keys = [k for k in KEYS if self.candidates(k)]
        return {k: min(c.value for c in self.candidates(k)) for k in keys}

    def with_limit(self, key: str, value: float, source: str, detail: str = "") -> Budget:
        """A copy of this budget with one more limit on ``key`` (the tighter of all applies)."""
        if key not in KEYS:
            raise ValueError(f"unknown budget key {key!r}")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"a {key} limit must be a positive number, got {value}")
        derived = dict(self.derived)
        derived[key] = (*derived.get(key, ()), Limit(float(value), source, detail))
        return replace(self, derived=derived)

    def check(self, measured: dict[str, float | None]) -> list[Constraint]:
        """Compare ``measured`` (same keys and units as :meth:`limits`) with every effective limit.

        A constraint whose measurement is missing (``None``) is reported as not met.
        """
        results = []
        for key, limit in self.limits().items():
            value = measured.get(key)
            met = value is not None and value <= limit
            candidates = tuple(self.candidates(key))
            tightest = min(candidates, key=lambda c: c.value)  # the first on a tie: --budget
            results.append(Constraint(key, limit, value, met, KEYS[key][0], tightest.source, candidates))
        return results


def _split_number(text: str, key: str) -> tuple[float, str]:
    match = _NUMBER_UNIT.match(text)
    if not match:
        raise BadInputError(f"bad budget value {key}={text!r}: expected {KEYS[key][1]}")
    value = float(match.group(1))
    if not math.isfinite(value) or value <= 0:
        raise BadInputError(f"bad budget value {key}={text!r}: the limit must be a positive number")
    return value, match.group(2)


def _parse_value(key: str, text: str) -> float:
    value, unit = _split_number(text, key)
    spelled = KEYS[key][1]
    if key == "latency":
        if not unit:
            raise BadInputError(f"bad budget value latency={text!r}: give a unit, e.g. {spelled}")
        factor = LATENCY_UNITS.get(unit) or LATENCY_UNITS.get(unit.lower())
        if factor is None:
            raise BadInputError(f"bad latency unit {unit!r} in latency={text!r}: use us, ms or s")
        return value * factor
    if key == "size":
        if not unit:
            raise BadInputError(f"bad budget value size={text!r}: give a unit, e.g. {spelled}")
        if unit.lower() not in SIZE_UNITS or (unit != "B" and unit.endswith("b")):
            raise BadInputError(
                f"bad size unit {unit!r} in size={text!r}: use B, KB, MB, GB (1 KB = 1000 B) or KiB, MiB, GiB"
            )
        return value * SIZE_UNITS[unit.lower()]
    if key in ("bitops", "params"):
        factor = COUNT_UNITS.get(unit.lower()) if len(unit) <= 1 else None
        if factor is None:
            raise BadInputError(f"bad count suffix {unit!r} in {key}={text!r}: use K, M, G or T")
        return value * factor
    # accuracy_drop
    if unit != "%":
        raise BadInputError(f"bad budget value accuracy_drop={text!r}: write a percentage such as 1%")
    if value > 100:
        raise BadInputError(f"bad budget value accuracy_drop={text!r}: at most 100%")
    return value / 100.0


def parse_budget(text: str) -> Budget:
    """Parse ``KEY=VALUE[,KEY=VALUE...]`` into a :class:`Budget` (see the module docstring)."""
    if not text or not text.strip():
        raise BadInputError("empty --budget: expected e.g. latency=4ms,size=500KB")
    budget = Budget(text=text.strip())
    seen: set[str] = set()
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise BadInputError(f"bad --budget {text!r}: an empty entry between commas")
        key, sep, raw = item.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not sep or not raw.strip():
            raise BadInputError(f"bad --budget entry {item!r}: expected KEY=VALUE, e.g. latency=4ms")
        if key not in KEYS:
            raise BadInputError(f"unknown budget key {key!r} in --budget (known: {', '.join(KEYS)})")
        if key in seen:
            raise BadInputError(f"budget key {key!r} is given twice in --budget")
        seen.add(key)
        value = _parse_value(key, raw.strip())
        if key == "latency":
            budget.latency_ms = value
        elif key == "size":
            budget.size_bytes = value
        elif key == "bitops":
            budget.bitops = value
        elif key == "params":
            budget.params = value
        else:
            budget.accuracy_drop = value
    return budget
