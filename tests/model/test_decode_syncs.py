"""Device→host reads during decoding, counted (tests/host_reads.py) at two lengths: the reads a
longer generation adds are the per-token cost a GPU pays in stalls.

- greedy, sampling, W8A8: none per token (without eos ids; with them, one "all finished?" check
  every 8 steps so that generation can stop early).
- beam search: the stop condition, read once every beam.CHECK_EVERY (4) steps.
- contrastive search: with eos ids, one "all finished?" read every 8 steps; none without.
- speculative decoding: one read per round (the accepted prefix and the emitted token: the host
  needs them to roll back both caches), not one per accepted token.
"""

import copy
import math

import pytest
import torch

import fastlm
from fastlm.decoding import beam, contrastive
from fastlm.quant import quantize
from tests.host_reads import HostReads

SHORT, LONG = 8, 24


def _config(**kw):
    base = dict(arch="llama", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                intermediate_size=96, max_position_embeddings=128)
    return fastlm.ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    model = fastlm.Model(_config()).eval()
    draft = fastlm.Model(_config(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)).eval()
    w8a8 = quantize(copy.deepcopy(model), "w8a8", calibration=torch.randint(0, 128, (2, 16)))
    return model, draft, w8a8


IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(3))


def _reads(fn, n):
    with HostReads() as reads:
        fn(n)
    return reads


@pytest.mark.parametrize("name", ["greedy", "sampling", "w8a8"])
def test_no_read_per_token(models, name):
    model, _, w8a8 = models
    run = {
        "greedy": lambda n: fastlm.generate(model, IDS, max_new_tokens=n),
        "sampling": lambda n: fastlm.generate(model, IDS, max_new_tokens=n, do_sample=True, top_k=20, top_p=0.9,
                                              seed=0),
        "w8a8": lambda n: fastlm.generate(w8a8, IDS, max_new_tokens=n),
    }[name]
    short, long = _reads(run, SHORT), _reads(run, LONG)
    assert long.count == short.count, long.where


def test_w8a8_layers_read_nothing_per_forward(models):
    _, _, w8a8 = models
    layer = next(m for m in w8a8.modules() if isinstance(m, fastlm.quant.W8A8Linear) and m.input_smooth is not None)
    with HostReads() as reads:
        layer(torch.randn(3, layer.in_features))
    assert reads.count == 0, reads.where


def test_w8a8_smoothing_factors_are_checked_at_construction_and_load(models):
    _, _, w8a8 = models
    layer = next(m for m in w8a8.modules() if isinstance(m, fastlm.quant.W8A8Linear) and m.input_smooth is not None)
    bad = torch.ones(layer.in_features)
    bad[3] = 0.0
    with pytest.raises(fastlm.quant.QuantizationError, match="input_smooth"):
        fastlm.quant.W8A8Linear(layer.weight, layer.weight_scale, layer.bias, bad)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["input_smooth"][0] = math.nan
    with pytest.raises(fastlm.quant.QuantizationError, match="input_smooth"):
        copy.deepcopy(layer).load_state_dict(state)


def test_greedy_with_eos_checks_every_8_steps(models):
    model, _, _ = models
    run = lambda n: fastlm.generate(model, IDS, max_new_tokens=n, eos_token_id=127)  # noqa: E731
    short, long = _reads(run, SHORT), _reads(run, LONG)
    assert long.count - short.count == (LONG - SHORT) // 8, long.where


def test_beam_search_reads_the_stop_condition_every_few_steps(models):
    model, _, _ = models
    run = lambda n: fastlm.generate(model, IDS, max_new_tokens=n, num_beams=3)  # noqa: E731
    short, long = _reads(run, SHORT), _reads(run, LONG)
    assert long.count - short.count == (LONG - SHORT) // beam.CHECK_EVERY, long.where


@pytest.mark.parametrize("eos", [None, 127])
def test_contrastive_search_reads(models, eos):
    model, _, _ = models
    run = lambda n: fastlm.generate(model, IDS, max_new_tokens=n, penalty_alpha=0.6, top_k=4,  # noqa: E731
                                    eos_token_id=eos)
    short, long = _reads(run, SHORT), _reads(run, LONG)
    per_check = 0 if eos is None else (LONG - SHORT) // contrastive.CHECK_EVERY
    assert long.count - short.count == per_check, long.where


@pytest.mark.parametrize("do_sample", [False, True])
def test_speculative_decoding_reads_once_per_round(models, do_sample):
    model, draft, _ = models
    ids = IDS[:1]
    with HostReads() as reads:
        out = fastlm.generate(model, ids, max_new_tokens=LONG, draft_model=draft, num_draft_tokens=3,
                              do_sample=do_sample, seed=0)
    rounds = [w for w in reads.where if "speculative.py" in w]
    assert all(w.startswith("tolist") for w in rounds), reads.where
    # A round emits 1..γ+1 tokens: at least LONG / (γ + 1) rounds, at most LONG.
    assert math.ceil(LONG / 4) <= len(rounds) <= LONG
    assert reads.count - len(rounds) <= 3  # prompt checks (generate, target and draft prefill)
    assert out.shape == (1, 8 + LONG)


def test_beam_results_unchanged_by_the_steps_run_past_the_end(models, monkeypatch):
    """Reading the stop condition every step (the old behaviour) or every 4 gives the same beams."""
    model, _, _ = models
    kwargs = dict(max_new_tokens=LONG, num_beams=3, eos_token_id=[5, 17, 40], early_stopping=True)
    every4 = fastlm.generate(model, IDS, **kwargs)
    monkeypatch.setattr(beam, "CHECK_EVERY", 1)
    assert torch.equal(fastlm.generate(model, IDS, **kwargs), every4)
