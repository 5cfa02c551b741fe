"""The agent's continuous action a ∈ [0, 1] and the bit-widths it stands for.

HAQ (Wang et al., CVPR 2019, §3.2) maps a continuous action to a discrete bit-width
with ``b = round(b_min − 0.5 + a · (b_max − b_min + 1))``, so every bit-width owns an
equal slice of [0, 1]. On a target whose fastest kernel is int8 (ONNX Runtime on CPU),
the action space gets one more level above ``b_max``: "keep this layer in float"
(``None``), so a latency budget above the int8 cost can buy float layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: A bit-width as the IR spells it: an integer, or ``None`` for float32.
Bits = int | None


@dataclass(frozen=True)
class BitLevels:
    """The discrete bit-widths an action can choose, from lowest to highest.

    ``b_min``..``b_max`` are integer widths; ``with_float`` adds float (``None``) on top.
    """

    b_min: int = 2
    b_max: int = 8
    with_float: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.b_min <= self.b_max:
            raise ValueError(f"need 1 <= b_min <= b_max, got b_min={self.b_min}, b_max={self.b_max}")

    @property
    def levels(self) -> list[Bits]:
        """Every level in increasing precision, float last when offered."""
        ints: list[Bits] = list(range(self.b_min, self.b_max + 1))
        return [*ints, None] if self.with_float else ints

    @property
    def count(self) -> int:
        return self.b_max - self.b_min + 1 + int(self.with_float)

    def index(self, bits: Bits) -> int:
        """Position of ``bits`` in :attr:`levels` (0 = lowest)."""
        if bits is None:
            if not self.with_float:
                raise ValueError("float is not a level of this action space")
            return self.count - 1
        if not self.b_min <= bits <= self.b_max:
            raise ValueError(f"{bits} bits is outside {self.b_min}..{self.b_max}")
        return bits - self.b_min

    def to_bits(self, action: float) -> Bits:
        """HAQ §3.2: ``round(b_min − 0.5 + a·L)`` with L levels, rounding halves up, clamped.

        Rounding halves up (``floor(x + 0.5)``) gives each level exactly 1/L of [0, 1];
        banker's rounding would make neighbouring slices unequal. ``a = 1`` lands on the top level.
        """
        a = min(max(float(action), 0.0), 1.0)
        position = math.floor(self.b_min - 0.5 + a * self.count + 0.5)
        index = min(max(position - self.b_min, 0), self.count - 1)
        return self.levels[index]

    def to_action(self, bits: Bits) -> float:
        """The centre of the slice of [0, 1] that maps to ``bits`` (inverse of :meth:`to_bits`)."""
        return (self.index(bits) + 0.5) / self.count

    def normalized(self, bits: Bits) -> float:
        """``bits`` scaled to (0, 1] for the state's previous-action column (float = 1)."""
        return (self.index(bits) + 1) / self.count

    def lower(self, bits: Bits) -> Bits:
        """One level below ``bits`` (float → b_max → … → b_min); ``b_min`` stays ``b_min``."""
        return self.levels[max(self.index(bits) - 1, 0)]

    def is_lowest(self, bits: Bits) -> bool:
        return self.index(bits) == 0
