"""Genotypes in the DARTS code's format, the published cells, and their derivation from α.

A genotype is ``Genotype(normal, normal_concat, reduce, reduce_concat)``: ``normal`` lists
``(op, input)`` pairs, two per intermediate node in node order, ``input`` indexing the cell's
states (0 and 1 are the two cell inputs, ``k + 2`` is intermediate node ``k``); ``*_concat``
lists the states concatenated into the cell's output.

Derivation (Liu et al., ICLR 2019, sec. 2.4): on each edge the strongest op other than
``none``; each intermediate node keeps the two incoming edges whose strongest non-``none`` op is
strongest. Strength is the *softmax* of α over the edge's candidates (eq. 2), never raw α:
raw logits are not comparable across edges, and ranking by them picks other edges.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fxsculpt.ir.errors import BadInputError
from fxsculpt.nas.darts.ops import PRIMITIVES


class Genotype(NamedTuple):
    """The DARTS code's genotype record (field names and meaning identical)."""

    normal: list[tuple[str, int]]
    normal_concat: list[int]
    reduce: list[tuple[str, int]]
    reduce_concat: list[int]

    def as_dict(self) -> dict[str, Any]:
        return {
            "normal": [[op, int(j)] for op, j in self.normal],
            "normal_concat": [int(i) for i in self.normal_concat],
            "reduce": [[op, int(j)] for op, j in self.reduce],
            "reduce_concat": [int(i) for i in self.reduce_concat],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Genotype:
        try:
            return cls(
                normal=[(str(op), int(j)) for op, j in data["normal"]],
                normal_concat=[int(i) for i in data["normal_concat"]],
                reduce=[(str(op), int(j)) for op, j in data["reduce"]],
                reduce_concat=[int(i) for i in data["reduce_concat"]],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInputError(
                f"not a DARTS genotype (needs normal, normal_concat, reduce, reduce_concat): {exc}"
            ) from None


# The cells published with the paper (DARTS code, cnn/genotypes.py): first and second order.
DARTS_V1 = Genotype(
    normal=[
        ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 0),
        ("skip_connect", 0),
        ("sep_conv_3x3", 1),
        ("skip_connect", 0),
        ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 0),
        ("skip_connect", 2),
    ],
    normal_concat=[2, 3, 4, 5],
    reduce=[
        ("max_pool_3x3", 0),
        ("max_pool_3x3", 1),
        ("skip_connect", 2),
        ("max_pool_3x3", 0),
        ("max_pool_3x3", 0),
        ("skip_connect", 2),
        ("skip_connect", 2),
        ("avg_pool_3x3", 0),
    ],
    reduce_concat=[2, 3, 4, 5],
)
DARTS_V2 = Genotype(
    normal=[
        ("sep_conv_3x3", 0),
        ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 0),
        ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 1),
        ("skip_connect", 0),
        ("skip_connect", 0),
        ("dil_conv_3x3", 2),
    ],
    normal_concat=[2, 3, 4, 5],
    reduce=[
        ("max_pool_3x3", 0),
        ("max_pool_3x3", 1),
        ("skip_connect", 2),
        ("max_pool_3x3", 1),
        ("max_pool_3x3", 0),
        ("skip_connect", 2),
        ("skip_connect", 2),
        ("max_pool_3x3", 1),
    ],
    reduce_concat=[2, 3, 4, 5],
)

PUBLISHED: dict[str, Genotype] = {"DARTS_V1": DARTS_V1, "DARTS_V2": DARTS_V2, "DARTS": DARTS_V2}


def derive_cell(
    weights: torch.Tensor, steps: int, primitives: Sequence[str] = PRIMITIVES, keep: int = 2
) -> list[tuple[str, int]]:
    """The ``(op, input)`` pairs of one cell from its edges' mixture weights.

    ``weights`` has one row per edge in the cell's order (node 0's 2 edges, node 1's 3, ...)
    and one column per primitive; pass softmax(α) (see :func:`softmax_rows`), not raw α.
    Each node keeps its ``keep`` edges ranked by their strongest non-``none`` weight, listed
    strongest first, each with its strongest non-``none`` op (sec. 2.4).
    """
    expected = sum(2 + i for i in range(steps))
    if weights.dim() != 2 or weights.shape[0] != expected or weights.shape[1] != len(primitives):
        raise ValueError(f"expected {expected} edges x {len(primitives)} ops, got {tuple(weights.shape)}")
    allowed = [k for k, name in enumerate(primitives) if name != "none"]
    gene: list[tuple[str, int]] = []
    start = 0
    for node in range(steps):
        rows = weights[start : start + node + 2]
        strength = [max(float(rows[j][k]) for k in allowed) for j in range(node + 2)]
        edges = sorted(range(node + 2), key=lambda j: -strength[j])[:keep]
        for j in edges:
            best = max(allowed, key=lambda k: float(rows[j][k]))
            gene.append((primitives[best], j))
        start += node + 2
    return gene


def softmax_rows(alphas: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Stack per-edge α and softmax each row: the mixture weights of eq. 2."""
    stacked = alphas if isinstance(alphas, torch.Tensor) else torch.stack([a.detach() for a in alphas])
    return torch.softmax(stacked.detach().float().cpu(), dim=-1)


def derive_genotype(
    alphas_normal: Sequence[torch.Tensor] | torch.Tensor,
    alphas_reduce: Sequence[torch.Tensor] | torch.Tensor,
    steps: int = 4,
    multiplier: int = 4,
    primitives: Sequence[str] = PRIMITIVES,
) -> Genotype:
    """The genotype of a searched cell space from its (raw) α, softmaxed per edge first."""
    concat = list(range(2 + steps - multiplier, steps + 2))
    return Genotype(
        normal=derive_cell(softmax_rows(alphas_normal), steps, primitives),
        normal_concat=concat,
        reduce=derive_cell(softmax_rows(alphas_reduce), steps, primitives),
        reduce_concat=concat,
    )


def load_genotype(name_or_path: str) -> Genotype:
    """A published genotype by name (``DARTS_V1``, ``DARTS_V2``) or a ``genotype.json`` file."""
    if name_or_path in PUBLISHED:
        return PUBLISHED[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        known = ", ".join(sorted(PUBLISHED))
        raise BadInputError(f"genotype '{name_or_path}' is neither a known name ({known}) nor a file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"genotype file {path} is not readable JSON: {exc}") from None
    if isinstance(data, dict) and "genotype" in data and isinstance(data["genotype"], dict):
        data = data["genotype"]
    if not isinstance(data, dict):
        raise BadInputError(f"genotype file {path} does not hold a JSON object")
    genotype = Genotype.from_dict(data)
    for op, _ in [*genotype.normal, *genotype.reduce]:
        if op not in PRIMITIVES or op == "none":
            raise BadInputError(f"genotype file {path} names op '{op}', which is not a DARTS op")
    if len(genotype.normal) % 2 or len(genotype.reduce) != len(genotype.normal):
        raise BadInputError(f"genotype file {path} needs two (op, input) pairs per node in both cells")
    return genotype
