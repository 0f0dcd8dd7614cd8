"""Positional encodings: the sinusoidal formula, its linear shift property, and why order needs them."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from qkv import Encoder, ModelConfig
from qkv.positions import RotaryPositions, sinusoidal_encoding, sinusoidal_shift_matrix


def formula_table(n_positions: int, d_model: int) -> torch.Tensor:
    """The paper's formula, term by term with the math module: an independent reference."""
    rows = []
    for pos in range(n_positions):
        row = []
        for dim in range(d_model):
            two_i = dim - dim % 2
            angle = pos / 10000 ** (two_i / d_model)
            row.append(math.sin(angle) if dim % 2 == 0 else math.cos(angle))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize(("n_positions", "d_model"), [(50, 16), (128, 512), (7, 2)])
def test_sinusoidal_table_equals_the_formula(n_positions: int, d_model: int) -> None:
    table = sinusoidal_encoding(n_positions, d_model)
    assert table.shape == (n_positions, d_model)
    assert table.dtype == torch.float32
    assert (table.double() - formula_table(n_positions, d_model)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("k", [0, 1, 2, 5, 17, -3])
def test_a_fixed_linear_map_shifts_the_encoding_by_k(k: int) -> None:
    d_model, n = 64, 200
    table = formula_table(n + abs(k), d_model)
    m_k = sinusoidal_shift_matrix(k, d_model)
    assert m_k.shape == (d_model, d_model)
    positions = range(max(0, -k), n)  # every pos with pos + k in the table
    for pos in positions:
        assert (m_k @ table[pos] - table[pos + k]).abs().max().item() <= 1e-9, pos
    # The same M_k for every position: it is one matrix applied to the whole table at once.
    shifted = table[max(0, -k) : n] @ m_k.T
    assert torch.allclose(shifted, table[max(0, -k) + k : n + k], atol=1e-9)


def test_sinusoidal_encoding_rejects_odd_d_model() -> None:
    with pytest.raises(ValueError, match="d_model=7 must be even"):
        sinusoidal_encoding(4, 7)


def test_rope_scores_depend_only_on_the_offset() -> None:
    rope = RotaryPositions(64, 16)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, 16, generator=gen).unbind(0)

    def score(i: int, j: int) -> float:
        rq = rope.rotary(torch.tensor([[i]]))(q)
        rk = rope.rotary(torch.tensor([[j]]))(k)
        return (rq * rk).sum().item()

    for offset in (0, 3, -5):
        values = [score(i, i + offset) for i in range(10, 40, 7)]
        assert max(values) - min(values) <= 1e-4, offset


# ----------------------------------------------------------------------------------------------------------
# Order matters: "dog bites man" is not "man bites dog".
# ----------------------------------------------------------------------------------------------------------

WORDS = {"dog": 0, "bites": 1, "man": 2}


def sentence_ids(sentence: str) -> torch.Tensor:
    return torch.tensor([[WORDS[w] for w in sentence.split()]])


def word_encoder(positional: str) -> Encoder:
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny-encoder", vocab_size=len(WORDS), positional=positional)
    return Encoder(config).eval()


def test_without_positions_the_encoder_is_permutation_equivariant() -> None:
    encoder = word_encoder("none")
    dog_bites_man = sentence_ids("dog bites man")
    man_bites_dog = sentence_ids("man bites dog")
    with torch.no_grad():
        h1, h2 = encoder(dog_bites_man), encoder(man_bites_dog)
    reverse = [2, 1, 0]  # "man bites dog" is "dog bites man" reversed
    assert torch.equal(man_bites_dog, dog_bites_man[:, reverse])
    assert (h2 - h1[:, reverse]).abs().max().item() <= 1e-6
    # So "dog" means the same thing in both sentences: the model cannot tell who bites whom.
    assert (h1[0, 0] - h2[0, 2]).abs().max().item() <= 1e-6
    # And it holds for every permutation, not just this one.
    with torch.no_grad():
        for perm in itertools.permutations(range(3)):
            permuted = encoder(dog_bites_man[:, list(perm)])
            assert (permuted - h1[:, list(perm)]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "rope"])
def test_with_positions_word_order_changes_the_meaning(positional: str) -> None:
    encoder = word_encoder(positional)
    with torch.no_grad():
        h1 = encoder(sentence_ids("dog bites man"))
        h2 = encoder(sentence_ids("man bites dog"))
    reverse = [2, 1, 0]
    # "dog" as the subject and "dog" as the object now get different representations.
    assert (h2 - h1[:, reverse]).abs().max().item() > 1e-4  # far above the 1e-6 of the equivariant case
    assert (h1[0, 0] - h2[0, 2]).abs().max().item() > 1e-4  # far above the 1e-6 of the equivariant case


def test_bidirectional_alibi_cannot_tell_a_sentence_from_its_reverse() -> None:
    """ALiBi's penalty -m|i - j| is symmetric, and reversing a sentence keeps every distance |i - j|.

    So an encoder (no causal mask) with ALiBi reads "man bites dog" as "dog bites man" reversed, yet other
    permutations, which change distances, do change its outputs.
    """
    encoder = word_encoder("alibi")
    dog_bites_man = sentence_ids("dog bites man")
    with torch.no_grad():
        h1 = encoder(dog_bites_man)
        reversed_ = encoder(sentence_ids("man bites dog"))
        swapped = encoder(dog_bites_man[:, [1, 0, 2]])  # "bites dog man"
    assert (reversed_ - h1[:, [2, 1, 0]]).abs().max().item() <= 1e-6
    assert (swapped - h1[:, [1, 0, 2]]).abs().max().item() > 1e-4
