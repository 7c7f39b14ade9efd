"""ops.sample: statistically against the filtered distribution, greedy, seeds and bad input."""

import math

import pytest
import torch

from fastlm import ops
from fastlm.ops import reference

N_DRAWS = 20000


def _frequencies(logits, n=N_DRAWS, seed=0, **kwargs):
    """Empirical distribution of n draws for the single row of logits (batched as n rows)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = ops.sample(logits.expand(n, -1), generator=generator, **kwargs)
    return torch.bincount(tokens, minlength=logits.shape[-1]).double() / n


def _chi_square_p_value(freq, probs, n=N_DRAWS):
    """P-value of Pearson's chi-square goodness of fit over the tokens of positive probability."""
    keep = probs > 0
    expected = probs[keep] * n
    stat = ((freq[keep] * n - expected) ** 2 / expected).sum().item()
    dof = int(keep.sum()) - 1
    # Wilson–Hilferty normal approximation of the chi-square upper tail.
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


FILTERS = [
    dict(temperature=1.0),
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=5),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=0.9, top_k=8, top_p=0.7),
    dict(temperature=1.0, top_k=1),
]


@pytest.mark.parametrize("kwargs", FILTERS, ids=[str(f) for f in FILTERS])
def test_draws_follow_the_filtered_distribution(kwargs):
    torch.manual_seed(0)
    logits = torch.randn(1, 40) * 1.5
    logits[0, 3] = float("-inf")  # a masked token
    probs = reference.filtered_probs(logits, kwargs["temperature"], kwargs.get("top_k"), kwargs.get("top_p"))[0]
    freq = _frequencies(logits, **kwargs)
    assert (freq[probs == 0] == 0).all(), "a filtered token was drawn"
    assert (freq[probs >= 0.01] > 0).all(), "a kept token of probability >= 1% was never drawn"
    cosine = torch.nn.functional.cosine_similarity(freq, probs.double(), dim=0)
    assert cosine >= 0.99
    if int((probs > 0).sum()) > 1:
        assert _chi_square_p_value(freq, probs.double()) > 1e-4


def test_temperature_zero_is_argmax():
    logits = torch.randn(6, 50)
    assert torch.equal(ops.sample(logits, temperature=0.0), logits.argmax(-1))
    assert torch.equal(ops.sample(logits, temperature=1.0, top_k=1), logits.argmax(-1))


def test_same_generator_seed_same_tokens():
    logits = torch.randn(16, 100)
    a = ops.sample(logits, generator=torch.Generator().manual_seed(3), top_p=0.9)
    b = ops.sample(logits, generator=torch.Generator().manual_seed(3), top_p=0.9)
    c = ops.sample(logits, generator=torch.Generator().manual_seed(4), top_p=0.9)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.int64 and a.shape == (16,)


def test_top_k_larger_than_vocab_keeps_everything():
    logits = torch.randn(1, 5)
    freq = _frequencies(logits, n=5000, top_k=100)
    assert (freq > 0).all()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=-0.1), "temperature must be a number >= 0"),
        (dict(temperature=float("nan")), "temperature must be a number >= 0"),
        (dict(top_k=0), "top_k must be an integer >= 1"),
        (dict(top_k=2.5), "top_k must be an integer >= 1"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ops.sample(torch.randn(2, 5), **kwargs)


def test_bad_logits():
    logits = torch.randn(2, 5)
    logits[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ops.sample(logits)
    logits[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"\+inf"):
        ops.sample(logits)
    logits[1] = float("-inf")
    with pytest.raises(ValueError, match="no finite value"):
        ops.sample(logits)
    with pytest.raises(ValueError, match="2 dims"):
        ops.sample(torch.randn(5))
    with pytest.raises(ValueError, match="non-empty"):
        ops.sample(torch.randn(0, 5))
    with pytest.raises(TypeError, match="floating-point"):
        ops.sample(torch.ones(2, 5, dtype=torch.int64))
