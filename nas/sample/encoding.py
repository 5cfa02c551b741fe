"""A DARTS cell pair as a token sequence, with its grammar (NAO, Luo et al. 2018, sec. 3.1).

Each intermediate node ``i`` (0-based) of a cell is four tokens ``(input1, op1, input2, op2)``;
inputs ``0`` and ``1`` are the cell's two inputs (the outputs of the two previous cells) and
``k >= 2`` is intermediate node ``k - 2``, so node ``i`` may read inputs ``0 .. i + 1`` only.
The normal cell comes first, then the reduction cell: ``8 * steps`` tokens (32 for DARTS's
4 nodes, 40 for the 5 nodes of NAO and ENAS).

Tokens share one vocabulary, as in NAO's encoder: ``0`` is the start/end symbol, input ``j``
is ``1 + j`` and op ``k`` is ``1 + (steps + 1) + k``. The genotype is DARTS's
(``normal``, ``normal_concat``, ``reduce``, ``reduce_concat``; each node two ``(op, input)``
pairs; every intermediate node concatenated), so conversion both ways is lossless.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from fxsculpt.ir.errors import BadInputError

#: DARTS's candidate ops without ``none``: a derived DARTS cell never uses the zero op either.
DEFAULT_OPS: tuple[str, ...] = (
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)

#: One node: (input1, op1, input2, op2), inputs and ops as plain indices (not vocabulary ids).
NodeSpec = tuple[int, int, int, int]
#: One cell: a node spec per intermediate node.
CellSpec = tuple[NodeSpec, ...]


class Arch(NamedTuple):
    """A candidate architecture: the normal cell and the reduction cell (hashable: the cache key)."""

    normal: CellSpec
    reduce: CellSpec


class GenotypeTuple(NamedTuple):
    """DARTS's genotype layout, used when ``nas.darts.genotype`` is not importable."""

    normal: list[tuple[str, int]]
    normal_concat: list[int]
    reduce: list[tuple[str, int]]
    reduce_concat: list[int]


@dataclass(frozen=True)
class SearchSpace:
    """The cell space: ``steps`` intermediate nodes per cell and the candidate ``ops``."""

    steps: int = 4
    ops: tuple[str, ...] = DEFAULT_OPS

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise BadInputError(f"a cell needs at least one intermediate node, got steps={self.steps}")
        if not self.ops:
            raise BadInputError("the search space needs at least one candidate op")
        if "none" in self.ops:
            raise BadInputError("the zero op 'none' cannot be sampled: a node would carry nothing")

    # -- vocabulary -------------------------------------------------------------------------
    @property
    def num_inputs(self) -> int:
        """How many distinct input indices exist (the last node may read ``0 .. steps``)."""
        return self.steps + 1

    @property
    def vocab_size(self) -> int:
        """Start symbol + input tokens + op tokens."""
        return 1 + self.num_inputs + len(self.ops)

    @property
    def length(self) -> int:
        """Tokens per architecture: 4 per node, two cells."""
        return 8 * self.steps

    def input_token(self, j: int) -> int:
        return 1 + j

    def op_token(self, k: int) -> int:
        return 1 + self.num_inputs + k

    def is_input_position(self, position: int) -> bool:
        """Positions 0 and 2 of every 4-token node block hold inputs; 1 and 3 hold ops."""
        return position % 2 == 0

    def node_of(self, position: int) -> int:
        """The intermediate node (0-based, within its cell) a sequence position belongs to."""
        return (position // 4) % self.steps

    def allowed_tokens(self, position: int) -> list[int]:
        """The grammar: the tokens that may stand at ``position`` of a sequence."""
        if self.is_input_position(position):
            return [self.input_token(j) for j in range(self.node_of(position) + 2)]
        return [self.op_token(k) for k in range(len(self.ops))]

    # -- conversions ----------------------------------------------------------------------
    def to_tokens(self, arch: Arch) -> list[int]:
        """The architecture as ``length`` vocabulary tokens (normal cell, then reduction cell)."""
        tokens: list[int] = []
        for cell in (arch.normal, arch.reduce):
            for in1, op1, in2, op2 in cell:
                tokens += [
                    self.input_token(in1),
                    self.op_token(op1),
                    self.input_token(in2),
                    self.op_token(op2),
                ]
        return tokens

    def is_valid(self, tokens: Sequence[int]) -> bool:
        """Whether ``tokens`` has the right length and obeys the grammar at every position."""
        if len(tokens) != self.length:
            return False
        return all(int(t) in self.allowed_tokens(p) for p, t in enumerate(tokens))

    def from_tokens(self, tokens: Sequence[int]) -> Arch:
        """Parse a token sequence; raises ``ValueError`` if it breaks the grammar."""
        if not self.is_valid(tokens):
            raise ValueError(f"token sequence breaks the grammar of a {self.steps}-node cell: {list(tokens)}")
        values = [int(t) - 1 if p % 2 == 0 else int(t) - 1 - self.num_inputs for p, t in enumerate(tokens)]
        nodes = [tuple(values[4 * n : 4 * n + 4]) for n in range(2 * self.steps)]
        return Arch(tuple(nodes[: self.steps]), tuple(nodes[self.steps :]))  # type: ignore[arg-type]

    def check(self, arch: Arch) -> Arch:
        """Return ``arch`` if it is in the space, else raise ``ValueError``."""
        if not self._shape_ok(arch):
            raise ValueError(f"architecture does not have {self.steps} nodes of 4 entries per cell")
        self.from_tokens(self.to_tokens(arch))  # raises on an index outside the grammar
        return arch

    def _shape_ok(self, arch: Arch) -> bool:
        return (
            len(arch) == 2
            and all(len(cell) == self.steps for cell in arch)
            and all(len(node) == 4 for cell in arch for node in cell)
        )

    def to_genotype(self, arch: Arch) -> Any:
        """DARTS's genotype (``nas.darts.genotype.Genotype`` when available) for ``arch``."""
        self.check(arch)
        genotype_cls = _genotype_class()

        def cell_pairs(cell: CellSpec) -> list[tuple[str, int]]:
            pairs: list[tuple[str, int]] = []
            for in1, op1, in2, op2 in cell:
                pairs += [(self.ops[op1], in1), (self.ops[op2], in2)]
            return pairs

        concat = list(range(2, 2 + self.steps))
        return genotype_cls(
            normal=cell_pairs(arch.normal),
            normal_concat=concat,
            reduce=cell_pairs(arch.reduce),
            reduce_concat=list(concat),
        )

    def from_genotype(self, genotype: Any) -> Arch:
        """The architecture of a DARTS genotype; refuses genotypes outside this space."""
        cells: list[CellSpec] = []
        for name in ("normal", "reduce"):
            pairs = [(str(op), int(j)) for op, j in getattr(genotype, name)]
            concat = [int(c) for c in getattr(genotype, f"{name}_concat")]
            if len(pairs) != 2 * self.steps:
                raise ValueError(f"{name} cell has {len(pairs) // 2} nodes, the space has {self.steps}")
            if sorted(concat) != list(range(2, 2 + self.steps)):
                raise ValueError(f"{name}_concat {concat} does not concatenate every intermediate node")
            nodes: list[NodeSpec] = []
            for i in range(self.steps):
                (op1, in1), (op2, in2) = pairs[2 * i], pairs[2 * i + 1]
                for op in (op1, op2):
                    if op not in self.ops:
                        raise ValueError(
                            f"op '{op}' in the {name} cell is not in the space ({', '.join(self.ops)})"
                        )
                for j in (in1, in2):
                    if not 0 <= j <= i + 1:
                        raise ValueError(
                            f"node {i} of the {name} cell reads input {j}: only 0..{i + 1} exist"
                        )
                nodes.append((in1, self.ops.index(op1), in2, self.ops.index(op2)))
            cells.append(tuple(nodes))
        return Arch(cells[0], cells[1])

    # -- sampling and edits ---------------------------------------------------------------
    def random_arch(self, rng: random.Random) -> Arch:
        """An architecture drawn uniformly from the grammar (each token independently)."""
        cells = []
        for _ in range(2):
            nodes = []
            for i in range(self.steps):
                nodes.append(
                    (
                        rng.randrange(i + 2),
                        rng.randrange(len(self.ops)),
                        rng.randrange(i + 2),
                        rng.randrange(len(self.ops)),
                    )
                )
            cells.append(tuple(nodes))
        return Arch(cells[0], cells[1])

    def mutate(self, arch: Arch, rng: random.Random) -> Arch:
        """Change one op or one input of one node to a different value (Real et al. 2019, sec. 2).

        Regularized evolution's two mutations: the "op mutation" and the "hidden state
        mutation", chosen with equal probability; the result always differs from ``arch``.
        """
        tokens = self.to_tokens(arch)
        want_op = rng.random() < 0.5
        positions = [p for p in range(self.length) if self.is_input_position(p) != want_op]
        position = rng.choice(positions)
        choices = [t for t in self.allowed_tokens(position) if t != tokens[position]]
        tokens[position] = rng.choice(choices)
        return self.from_tokens(tokens)

    def swap_inputs(self, arch: Arch, normal_node: int, reduce_node: int) -> Arch:
        """The same architecture with one node per cell listing its two branches the other way round.

        NAO's symmetric augmentation (Luo et al. 2018, sec. 3.4): a node ``op1(x1) + op2(x2)``
        equals ``op2(x2) + op1(x1)``, so both sequences must score alike.
        """
        cells = []
        for cell, node in ((arch.normal, normal_node), (arch.reduce, reduce_node)):
            nodes = list(cell)
            in1, op1, in2, op2 = nodes[node]
            nodes[node] = (in2, op2, in1, op1)
            cells.append(tuple(nodes))
        return Arch(cells[0], cells[1])

    def canonical(self, arch: Arch) -> Arch:
        """The representative of ``arch`` under branch swaps (each node's pairs sorted)."""
        cells = []
        for cell in arch:
            nodes = []
            for in1, op1, in2, op2 in cell:
                a, b = sorted([(in1, op1), (in2, op2)])
                nodes.append((a[0], a[1], b[0], b[1]))
            cells.append(tuple(nodes))
        return Arch(cells[0], cells[1])

    def describe(self, arch: Arch) -> str:
        """A compact human-readable spelling: ``normal: op(in)+op(in) | ... ; reduce: ...``."""
        parts = []
        for label, cell in (("normal", arch.normal), ("reduce", arch.reduce)):
            nodes = [f"{self.ops[o1]}({i1})+{self.ops[o2]}({i2})" for i1, o1, i2, o2 in cell]
            parts.append(f"{label}: " + " | ".join(nodes))
        return "; ".join(parts)


def genotype_to_json(genotype: Any) -> dict[str, Any]:
    """The genotype as plain JSON (lists of ``[op, input]``), the format genotype.json holds."""
    return {
        "normal": [[str(op), int(j)] for op, j in genotype.normal],
        "normal_concat": [int(c) for c in genotype.normal_concat],
        "reduce": [[str(op), int(j)] for op, j in genotype.reduce],
        "reduce_concat": [int(c) for c in genotype.reduce_concat],
    }


def genotype_from_json(data: dict[str, Any]) -> Any:
    """Inverse of :func:`genotype_to_json`."""
    genotype_cls = _genotype_class()
    return genotype_cls(
        normal=[(str(op), int(j)) for op, j in data["normal"]],
        normal_concat=[int(c) for c in data["normal_concat"]],
        reduce=[(str(op), int(j)) for op, j in data["reduce"]],
        reduce_concat=[int(c) for c in data["reduce_concat"]],
    )


def _genotype_class() -> Any:
    try:
        from fxsculpt.nas.darts.genotype import Genotype

        return Genotype
    except ImportError:
        return GenotypeTuple
