"""A packed forward (cu_seqlens) reads the offsets to the host once per forward, in Model.forward,
not once per layer; ``validate=False`` (the trainer: batches checked at the data boundary) reads
nothing. Bad offsets are still refused with the model's name."""

import inspect
from pathlib import Path

import pytest
import torch

from fastlm import Model, ModelConfig
from fastlm.ops import attn
from fastlm.train.data import document_boundaries
from tests.host_reads import HostReads


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                         intermediate_size=64, max_position_embeddings=64)
    return Model(config).eval()


def _packed():
    ids = torch.randint(1, 97, (2, 12))
    ids[0, 4] = ids[0, 9] = ids[1, 6] = 0
    return ids, document_boundaries(ids, separator=0)


def _line_of(function, text: str) -> str:
    """``file:line`` (as HostReads names a site) of the line of ``function`` holding ``text``."""
    lines, start = inspect.getsourcelines(function)
    index = next(i for i, line in enumerate(lines) if text in line)
    return f"ops/{Path(inspect.getsourcefile(function)).name}:{start + index}"


@pytest.mark.parametrize("validate", [True, False])
def test_a_packed_forward_reads_the_offsets_once_or_not_at_all(model, validate):
    ids, layout = _packed()
    with torch.no_grad():
        expected = model(ids, **layout)
        with HostReads() as reads:
            out = model(ids, validate=validate, **layout)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # The CPU reference of attention_varlen loops over the sequences on the host (its own reads,
    # 2 per layer; a GPU kernel has none): every other read is a check.
    loop = _line_of(attn._spans, ".tolist()")
    checks = [where for where in reads.where if not where.endswith(loop)]
    assert len(reads.where) - len(checks) == 2 * model.config.num_layers
    expected_checks = ["item at model.py", f"tolist at {_line_of(attn.check_cu_seqlens, '.tolist()')}"]
    assert sorted(c.rsplit(":", 1)[0] if c.startswith("item") else c for c in checks) == (
        sorted(expected_checks) if validate else []), reads.where


@pytest.mark.parametrize("cu, max_seqlen, message", [
    ([0, 5, 3, 24], 19, "non-decreasing"),
    ([0, 5, 10, 23], 13, "must equal the 24 packed tokens"),
    ([0, 5, 10, 24], 13, r"max_seqlen=13 is shorter than the longest sequence \(14\)"),
])
def test_bad_offsets_are_refused_by_the_model(model, cu, max_seqlen, message):
    ids = torch.randint(1, 97, (2, 12))
    with pytest.raises(ValueError, match=f"Model: .*{message}"):
        model(ids, cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=max_seqlen)


def test_offsets_of_the_wrong_dtype_are_refused_even_without_validate(model):
    ids = torch.randint(1, 97, (2, 12))
    with pytest.raises(TypeError, match="Model: expected cu_seqlens of dtype torch.int32"):
        model(ids, cu_seqlens=torch.tensor([0, 24]), max_seqlen=24, validate=False)
