"""fastlm.quant.accuracy_report mechanics on a tiny random model: each row is the perplexity of the
variant it names (checked against building that variant by hand), deltas are relative to the bf16
baseline, the goals are applied per variant, the options reach quantize, and the input model is
left untouched."""

import copy
import math

import pytest
import torch

import fastlm
from fastlm.eval import perplexity
from fastlm.quant import QuantizedLinear, accuracy_report, model_bytes, quantize, quantized_layers
from fastlm.quant.report import GOALS_PCT, VARIANTS

SEQ = 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = fastlm.ModelConfig(arch="llama", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4,
                                num_kv_heads=2, intermediate_size=96, max_position_embeddings=64,
                                tie_word_embeddings=True)
    return fastlm.Model(config).eval()


@pytest.fixture(scope="module")
def stream():
    return torch.randint(0, 128, (3 * SEQ + 1,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def calibration():
    return torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(2))


def _ppl(m, stream):
    return perplexity(m, stream, seq_len=SEQ, batch_size=2)


def test_rows_are_the_perplexities_of_the_named_variants(model, stream, calibration):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = accuracy_report(model, stream, seq_len=SEQ, batch_size=2, calibration=calibration, smooth_alpha=0.6,
                           variants=VARIANTS)
    by = {r["variant"]: r for r in rows}
    assert list(by) == ["float32", "bfloat16", "int8_weight_only", "w8a8", "w8a8_smoothquant"]

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    expected = {
        "float32": _ppl(model, stream),
        "bfloat16": _ppl(bf16, stream),
        "int8_weight_only": _ppl(quantize(copy.deepcopy(bf16)), stream),
        "w8a8": _ppl(quantize(copy.deepcopy(bf16), "w8a8"), stream),
        "w8a8_smoothquant": _ppl(quantize(copy.deepcopy(bf16), "w8a8", calibration=calibration, smooth_alpha=0.6),
                                 stream),
    }
    base = expected["bfloat16"]
    for name, row in by.items():
        assert row["perplexity"] == pytest.approx(expected[name], rel=1e-6), name
        assert row["delta_pct"] == pytest.approx(100 * (expected[name] - base) / base, rel=1e-5, abs=1e-9), name
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1
    assert by["bfloat16"]["delta_pct"] == 0.0
    # a random model's int8 noise is not zero: the comparison is not trivially passing
    assert by["w8a8"]["perplexity"] != by["bfloat16"]["perplexity"]

    # dtypes, options and goals per row
    assert [r["dtype"] for r in rows] == ["float32"] + ["bfloat16"] * 4
    assert [r["goal_pct"] for r in rows] == [None, None, 1.0, 3.0, 3.0]
    for row in rows:
        goal = row["goal_pct"]
        assert row["within_goal"] == (None if goal is None else abs(row["delta_pct"]) <= goal)
    assert [r["smooth_alpha"] for r in rows] == [None, None, None, None, 0.6]
    assert [r["include_head"] for r in rows] == [None, None, False, False, False]
    assert all(r["group_size"] is None for r in rows)
    assert GOALS_PCT["int8_weight_only"] == 1.0 and GOALS_PCT["w8a8"] == GOALS_PCT["w8a8_smoothquant"] == 3.0

    # memory: fp32 is twice bf16; int8 layers save 1 byte per weight minus 4-byte scales per row
    assert by["float32"]["weight_mb"] == pytest.approx(2 * by["bfloat16"]["weight_mb"])
    layers = quantized_layers(quantize(copy.deepcopy(bf16))).values()
    saved = sum(m.weight.numel() - 4 * m.out_features for m in layers)
    assert (by["bfloat16"]["weight_mb"] - by["int8_weight_only"]["weight_mb"]) * 2**20 == pytest.approx(saved)

    # the input model is left as it was
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    after = model.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], v) for k, v in before.items())


def test_group_size_and_head_reach_quantize(model, stream):
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    grouped, = accuracy_report(model, stream, seq_len=SEQ, batch_size=2, group_size=16,
                               variants=("int8_weight_only",))
    assert grouped["group_size"] == 16 and grouped["variant"] == "int8_weight_only"
    assert grouped["perplexity"] == pytest.approx(_ppl(quantize(copy.deepcopy(bf16), group_size=16), stream),
                                                  rel=1e-6)

    plain, head = (accuracy_report(model, stream, seq_len=SEQ, batch_size=2, include_head=h,
                                   variants=("int8_weight_only",))[0] for h in (False, True))
    assert head["include_head"] is True
    with_head = quantize(copy.deepcopy(bf16), include_head=True)
    assert isinstance(with_head.lm_head, QuantizedLinear)
    assert head["perplexity"] == pytest.approx(_ppl(with_head, stream), rel=1e-6)
    # tied embeddings: the int8 head is a tensor of its own (V·H int8 + V float32 scales)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    assert (head["weight_mb"] - plain["weight_mb"]) * 2**20 == vocab * hidden + 4 * vocab
    assert model_bytes(with_head) == head["weight_mb"] * 2**20


def test_rows_follow_the_requested_order_and_baseline_is_always_bf16(model, stream):
    rows = accuracy_report(model, stream, seq_len=SEQ, batch_size=2, max_batches=1,
                           variants=("w8a8", "fp32", "w8a8"))
    assert [r["variant"] for r in rows] == ["w8a8", "float32"]  # duplicates dropped
    bf16 = _ppl(copy.deepcopy(model).to(torch.bfloat16), stream[: 2 * SEQ + 1])
    assert rows[1]["delta_pct"] == pytest.approx(100 * (rows[1]["perplexity"] - bf16) / bf16, rel=1e-5, abs=1e-9)

    half, = accuracy_report(model, stream, seq_len=SEQ, batch_size=2, dtype=torch.float16, variants=("bf16",))
    assert half["variant"] == half["dtype"] == "float16"


def test_errors(model, stream):
    with pytest.raises(ValueError, match="unknown variants"):
        accuracy_report(model, stream, seq_len=SEQ, variants=("int4",))
    with pytest.raises(ValueError, match="calibration"):
        accuracy_report(model, stream, seq_len=SEQ, variants=("w8a8_smoothquant",))
    with pytest.raises(ValueError, match="dtype"):
        accuracy_report(model, stream, seq_len=SEQ, dtype=torch.int8)
    with pytest.raises(ValueError, match="group_size"):
        accuracy_report(model, stream, seq_len=SEQ, group_size=7, variants=("int8_weight_only",))
