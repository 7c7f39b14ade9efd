"""The lean eager decode step (fastlm.decoding.eager.EagerStep) computes what the model's forward
through the cache computes, bit for bit: logits, cache contents and lengths, for equal and ragged
lengths, sliding windows (with a per-layer RoPE base), biases, per-head q/k norms, MHA, an untied soft-capped head,
scaled embeddings and quantized (wrapped) linears. It is taken wherever it applies and nowhere
else, and generate gives the same tokens through it as through the general decode step."""

from __future__ import annotations

import copy

import pytest
import torch

import fastlm
from fastlm.decoding import eager, sampling
from fastlm.decoding.eager import EagerStep, reason_not_lean
from fastlm.quant import quantize
from tests.model.decode_cases import SMALL, perturbed, prefilled_pair

CASES = {
    "llama": dict(SMALL),
    "mistral-window": dict(SMALL, arch="mistral", sliding_window=5),
    "window-local-theta": dict(SMALL, sliding_window=5, layer_types=["sliding_attention", "full_attention"],
                               local_rope_theta=100.0),
    "qwen2-qkv-bias": dict(SMALL, arch="qwen2", qkv_bias=True),
    "qwen3-qk-norm": dict(SMALL, arch="qwen3"),
    "mha-biases": dict(SMALL, num_kv_heads=4, attention_bias=True, mlp_bias=True),
    "untied-softcap-scaled": dict(SMALL, tie_word_embeddings=False, final_softcap=5.0, scale_embeddings=True,
                                  query_pre_attn_scalar=12),
}


def _model(**config) -> fastlm.Model:
    torch.manual_seed(0)
    return perturbed(fastlm.Model(fastlm.ModelConfig(**config)))


def _check_against_forward(model, ragged: bool, steps: int = 8) -> None:
    with torch.no_grad():
        caches, tokens = prefilled_pair(model, ragged)
        assert reason_not_lean(model, caches[0]) is None
        step = EagerStep(model, caches[0])
        for _ in range(steps):  # past the window of 5
            ours = step(tokens)
            forward = model(tokens[:, None], cache=caches[1], validate=False)[:, -1].float()
            assert torch.equal(ours, forward)
            assert torch.equal(caches[0].lens, caches[1].lens) and caches[0].filled == caches[1].filled
            tokens = ours.argmax(-1)
    filled = caches[1].filled
    assert torch.equal(caches[0].k[:, :, :, :filled], caches[1].k[:, :, :, :filled])
    assert torch.equal(caches[0].v[:, :, :, :filled], caches[1].v[:, :, :, :filled])


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_lean_step_matches_the_forward(case, ragged):
    _check_against_forward(_model(**CASES[case]), ragged)


def test_wrapped_linears_are_called_as_modules():
    model = _model(**CASES["llama"])
    w8a8 = quantize(copy.deepcopy(model), "w8a8", calibration=torch.randint(0, 97, (2, 16)))
    assert any(isinstance(m, fastlm.quant.W8A8Linear) for m in w8a8.modules())
    _check_against_forward(w8a8, ragged=True, steps=4)


@pytest.mark.parametrize("config, why", [
    (dict(SMALL, arch="olmo2"), "placed 'post'"),
    (dict(SMALL, arch="gemma2", head_dim=16), "norm 'rms_offset'"),
    (dict(SMALL, arch="gpt2", num_kv_heads=4), "norm 'layer'"),
    (dict(SMALL, activation="gelu"), "gated MLP with gelu"),
    (dict(SMALL, rope_scaling={"rope_type": "linear", "factor": 2.0}), "scaled, partial or no RoPE"),
])
def test_other_models_are_refused_with_the_reason(config, why):
    model = _model(**config)
    cache = model.new_cache(1, 8)
    assert why in reason_not_lean(model, cache)
    with pytest.raises(ValueError, match="EagerStep: cannot run this model"):
        EagerStep(model, cache)


def test_other_dtypes_caches_and_backends_are_refused():
    model = _model(**SMALL)
    assert reason_not_lean(model, model.new_cache(1, 8)) is None
    assert "PagedKVCache" in reason_not_lean(model, model.new_cache(1, 8, paged=True))
    assert "dtype torch.bfloat16" in reason_not_lean(copy.deepcopy(model).to(torch.bfloat16), model.new_cache(1, 8))
    with fastlm.use_backend("triton"):
        assert "triton kernel" in reason_not_lean(model, model.new_cache(1, 8))


def test_an_empty_or_full_cache_is_an_error():
    model = _model(**SMALL)
    cache = model.new_cache(1, 3)
    with pytest.raises(RuntimeError, match="the cache is empty"):
        EagerStep(model, cache)(torch.tensor([1]))
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        with pytest.raises(ValueError, match=r"the cache is full \(3 positions\)"):
            EagerStep(model, cache)(torch.tensor([1]))


def _generate_both_ways(monkeypatch, model, prompt, **kwargs):
    calls = []
    original = EagerStep.__call__

    def counted(self, tokens):
        calls.append(1)
        return original(self, tokens)

    monkeypatch.setattr(EagerStep, "__call__", counted)
    lean = fastlm.generate(model, prompt, **kwargs)
    assert calls, "the lean step was not taken"
    monkeypatch.setattr(sampling, "reason_not_lean", lambda *args: "switched off by the test")
    general = fastlm.generate(model, prompt, **kwargs)
    return lean, general


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(eos_token_id=[3, 7], pad_token_id=1),
    dict(do_sample=True, top_k=20, seed=0),
    dict(repetition_penalty=1.3),
])
@pytest.mark.parametrize("ragged", [False, True])
def test_generate_gives_the_same_tokens_as_the_general_step(monkeypatch, kwargs, ragged):
    model = _model(**CASES["mistral-window"])
    prompt = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(2))
    if ragged:
        prompt = [row[:n].tolist() for row, n in zip(prompt, (6, 2, 4))]
    lean, general = _generate_both_ways(monkeypatch, model, prompt, max_new_tokens=12, **kwargs)
    if ragged:
        assert len(lean) == len(general) and all(torch.equal(a, b) for a, b in zip(lean, general))
    else:
        assert torch.equal(lean, general)


def test_eos_finishes_rows_in_the_lean_greedy_pick(monkeypatch):
    model = _model(**SMALL)
    prompt = torch.randint(0, 97, (4, 5), generator=torch.Generator().manual_seed(4))
    free = fastlm.generate(model, prompt, max_new_tokens=10)
    eos = int(free[0, 7])  # row 0's third new token
    lean, general = _generate_both_ways(monkeypatch, model, prompt, max_new_tokens=10, eos_token_id=eos,
                                        pad_token_id=0)
    assert torch.equal(lean, general)
    assert (lean[0, 8:] == 0).all() and lean[0, 7] == eos


@pytest.mark.parametrize("bad, at", [(float("nan"), 2), (float("inf"), 2), (float("nan"), 80)])
def test_bad_logits_of_one_row_in_a_lean_step_are_reported_with_its_index(monkeypatch, bad, at):
    model = _model(**dict(SMALL, max_position_embeddings=128))
    original, calls = EagerStep.__call__, []

    def poisoned(self, tokens):  # lean step ``at``: row 1 gets a NaN / +inf score
        logits = original(self, tokens)
        calls.append(1)
        if len(calls) == at:
            logits[1, 3] = bad
        return logits

    monkeypatch.setattr(EagerStep, "__call__", poisoned)
    with pytest.raises(ValueError, match=r"sequence\(s\) \[1\] contain NaN or \+inf"):
        fastlm.generate(model, torch.tensor([[1, 2], [3, 4], [5, 6]]), max_new_tokens=100)  # folds at 64 steps
    assert len(calls) == 99


def test_pick_greedy_keeps_finished_rows_padded():
    scores = torch.tensor([[0.0, 2.0, 1.0], [5.0, 1.0, 5.0]])
    finished = torch.tensor([True, False])
    tokens, now, best = eager.pick_greedy(scores, finished, torch.tensor([0]), torch.tensor(9))
    assert tokens.tolist() == [9, 0] and now.tolist() == [True, True] and best.tolist() == [2.0, 5.0]
    tokens, now, _ = eager.pick_greedy(scores, torch.tensor([False, False]), None, torch.tensor(9))
    assert tokens.tolist() == [1, 0] and now.tolist() == [False, False]
    assert eager.any_bad([torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), 0.0])]).tolist() == [True,
                                                                                                             True]
