"""The token encoding of DARTS cells: grammar, lossless conversions, sampling and mutation."""

from __future__ import annotations

import random

import pytest

from fxsculpt.nas.darts.genotype import DARTS_V1, DARTS_V2, Genotype
from fxsculpt.nas.sample.encoding import SearchSpace, genotype_from_json, genotype_to_json

SPACE = SearchSpace()


def hand_grammar_ok(space: SearchSpace, tokens: list[int]) -> bool:
    """The grammar written out independently: per node (in, op, in, op); node i reads 0..i+1."""
    if len(tokens) != 8 * space.steps:
        return False
    n_in = space.steps + 1
    for p, t in enumerate(tokens):
        node = (p // 4) % space.steps
        if p % 2 == 0:
            if not 1 <= t <= node + 2:  # input j is token 1 + j, j <= node + 1
                return False
        elif not n_in + 1 <= t <= n_in + len(space.ops):
            return False
    return True


def test_length_and_vocabulary_follow_the_space() -> None:
    assert SPACE.length == 32  # 4 nodes x 4 tokens x 2 cells
    assert SearchSpace(steps=5).length == 40  # NAO / ENAS: 5 nodes
    assert SPACE.vocab_size == 1 + 5 + 7


@pytest.mark.parametrize("genotype", [DARTS_V1, DARTS_V2], ids=["DARTS_V1", "DARTS_V2"])
def test_published_genotypes_round_trip(genotype: Genotype) -> None:
    arch = SPACE.from_genotype(genotype)
    tokens = SPACE.to_tokens(arch)
    assert hand_grammar_ok(SPACE, tokens)
    back = SPACE.to_genotype(SPACE.from_tokens(tokens))
    assert back.normal == genotype.normal and back.reduce == genotype.reduce
    assert back.normal_concat == genotype.normal_concat and back.reduce_concat == genotype.reduce_concat
    assert genotype_from_json(genotype_to_json(back)) == back


def test_darts_v2_tokens_by_hand() -> None:
    # DARTS_V2 normal node 0: (sep_conv_3x3, 0), (sep_conv_3x3, 1) -> tokens 1+0, op, 1+1, op
    sep3 = 1 + 5 + SPACE.ops.index("sep_conv_3x3")
    assert SPACE.to_tokens(SPACE.from_genotype(DARTS_V2))[:4] == [1, sep3, 2, sep3]


def test_sampled_and_mutated_sequences_obey_the_grammar_and_round_trip() -> None:
    rng = random.Random(0)
    for steps in (2, 4, 5):
        space = SearchSpace(steps=steps)
        for _ in range(200):
            arch = space.random_arch(rng)
            tokens = space.to_tokens(arch)
            assert hand_grammar_ok(space, tokens) and space.is_valid(tokens)
            assert space.from_tokens(tokens) == arch
            assert space.from_genotype(space.to_genotype(arch)) == arch
            child = space.mutate(arch, rng)
            child_tokens = space.to_tokens(child)
            assert hand_grammar_ok(space, child_tokens)
            assert sum(a != b for a, b in zip(tokens, child_tokens)) == 1  # exactly one op or input


def test_sampling_reaches_every_allowed_token() -> None:
    rng = random.Random(1)
    seen: dict[int, set[int]] = {p: set() for p in range(SPACE.length)}
    for _ in range(600):
        for p, t in enumerate(SPACE.to_tokens(SPACE.random_arch(rng))):
            seen[p].add(t)
    assert all(seen[p] == set(SPACE.allowed_tokens(p)) for p in range(SPACE.length))


def test_grammar_violations_are_refused() -> None:
    tokens = SPACE.to_tokens(SPACE.from_genotype(DARTS_V2))
    bad_input = list(tokens)
    bad_input[0] = 1 + 2  # node 0 reading node 0 itself (input 2)
    bad_op = list(tokens)
    bad_op[1] = 1  # an input token where an op belongs
    for bad in (bad_input, bad_op, tokens[:-1]):
        assert not SPACE.is_valid(bad) and not hand_grammar_ok(SPACE, bad)
        with pytest.raises(ValueError):
            SPACE.from_tokens(bad)


def test_genotypes_outside_the_space_are_refused() -> None:
    with_none = DARTS_V2._replace(normal=[("none", 0), *DARTS_V2.normal[1:]])
    with pytest.raises(ValueError, match="none"):
        SPACE.from_genotype(with_none)
    future_input = DARTS_V2._replace(normal=[("sep_conv_3x3", 2), *DARTS_V2.normal[1:]])
    with pytest.raises(ValueError, match="input 2"):
        SPACE.from_genotype(future_input)


def test_swapping_a_nodes_branches_keeps_the_canonical_form() -> None:
    rng = random.Random(2)
    arch = SPACE.random_arch(rng)
    swapped = SPACE.swap_inputs(arch, 1, 3)
    assert SPACE.canonical(swapped) == SPACE.canonical(arch)
    n = SPACE.to_tokens(arch)
    s = SPACE.to_tokens(swapped)
    assert s[4:8] == n[6:8] + n[4:6]  # normal node 1's two (input, op) pairs exchanged
