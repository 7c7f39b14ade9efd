"""Prepacked decode weights (fastlm.decoding.packed): each packed GEMM is within twice the error of a
plain float32 dot product (sequential sums, an order any float32 BLAS may take) of the float64
product; the lean step over packs stays as close to a float64 forward as the unpacked step (2x
rule); generate takes them on the CPU in float32, rebuilds them when the weights or the linears
change, and packs nothing where it does not apply."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import fastlm
from fastlm.decoding import cpu_gemm, packed
from fastlm.decoding.eager import EagerStep
from fastlm.decoding.packed import decode_pack_kind, pack_kind, packed_linears, release_packs
from fastlm.decoding.step import release_caches, weights_version
from tests.model.decode_cases import SMALL, perturbed

needs_packs = pytest.mark.skipif(pack_kind(8) is None, reason="torch built without oneDNN")


def _model() -> fastlm.Model:
    torch.manual_seed(0)
    return perturbed(fastlm.Model(fastlm.ModelConfig(**SMALL)))


def _max_error(x: torch.Tensor, exact: torch.Tensor) -> float:
    return (x.double() - exact).abs().max().item()


def _sequential_linear(h: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """h @ W^T + b in float32, each dot product summed term by term in order (no FMA, no blocking)."""
    out = torch.zeros(h.shape[0], linear.out_features)
    for k in range(h.shape[1]):
        out = out + h[:, k, None] * linear.weight[:, k]
    return out if linear.bias is None else out + linear.bias


def test_the_kind_follows_the_batch():
    if pack_kind(8) is None:
        assert pack_kind(1) is None
        return
    assert pack_kind(8) == pack_kind(3) == "onednn"
    assert pack_kind(1) == ("mkl" if torch.backends.mkl.is_available() else "onednn")
    with torch.backends.mkldnn.flags(enabled=False):
        assert pack_kind(1) is None and pack_kind(8) is None


@needs_packs
@pytest.mark.parametrize("kind, rows", [("mkl", 1), ("onednn", 1), ("onednn", 3), ("onednn", 8),
                                        ("fastlm", 1), ("fastlm", 3), ("fastlm", 8), ("fastlm", 13)])
@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_linear_is_within_twice_the_error_of_sequential_float32_sums(kind, rows, bias):
    if kind == "mkl" and pack_kind(1) != "mkl":
        pytest.skip("torch built without MKL")
    if kind == "fastlm" and not cpu_gemm.available():
        pytest.skip(f"fastlm's CPU GEMM: {cpu_gemm.status()[1]}")
    torch.manual_seed(rows)
    linear = nn.Linear(520, 328, bias=bias)
    h = torch.randn(rows, 2 * 520)[:, ::2]  # a strided input, as a split of a fused projection
    exact = torch.nn.functional.linear(h.double(), linear.weight.double(),
                                       None if linear.bias is None else linear.bias.double())
    with torch.no_grad():
        ours = packed._packed(linear, kind)(h)
        plain = _sequential_linear(h, linear)
    assert ours.shape == plain.shape and ours.dtype == torch.float32
    assert _max_error(ours, exact) <= 2 * _max_error(plain, exact) + 1e-7


@needs_packs
@pytest.mark.parametrize("batch", [1, 3])
def test_the_lean_step_over_packs_is_as_close_to_float64_as_without(batch):
    model = _model()
    exact = copy.deepcopy(model).double()
    prompt = torch.randint(0, 97, (batch, 9), generator=torch.Generator().manual_seed(1))
    tokens = torch.tensor([5, 17, 42])[:batch]
    with torch.no_grad():
        caches = [m.new_cache(batch, 24) for m in (model, model, exact)]
        for m, cache in zip((model, model, exact), caches):
            m(prompt, cache=cache)
        linears = packed_linears(model, batch, weights_version(model))
        assert set(linears) == {m for m in model.modules() if type(m) is nn.Linear}
        packed_step, plain_step = EagerStep(model, caches[0], linears), EagerStep(model, caches[1])
        for _ in range(6):
            ours, plain = packed_step(tokens), plain_step(tokens)
            reference = exact(tokens[:, None], cache=caches[2], validate=False)[:, -1]
            assert _max_error(ours, reference) <= 2 * _max_error(plain, reference) + 1e-6
            tokens = reference.argmax(-1)


@needs_packs
def test_generate_decodes_over_packs_kept_until_the_weights_change(monkeypatch):
    model = _model()
    built = []
    real = packed._packed
    monkeypatch.setattr(packed, "_packed", lambda linear, kind: built.append(kind) or real(linear, kind))
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(3))
    first = fastlm.generate(model, prompt, max_new_tokens=8)
    count = len(built)
    assert count == sum(type(m) is nn.Linear for m in model.modules()) and set(built) == {decode_pack_kind(2)}
    assert torch.equal(fastlm.generate(model, prompt, max_new_tokens=8), first)
    assert len(built) == count, "the packs of unchanged weights were built again"

    with torch.no_grad():  # an in-place change (as an optimizer step): new packs, the new model's tokens
        for p in model.parameters():
            p.mul_(-1.5)
    changed = fastlm.generate(model, prompt, max_new_tokens=8)
    assert len(built) == 2 * count
    fresh = copy.deepcopy(model)
    monkeypatch.setattr(packed, "PACK_MAX_BYTES", 0)
    assert torch.equal(changed, fastlm.generate(fresh, prompt, max_new_tokens=8))
    assert not torch.equal(changed, first)


@needs_packs
def test_a_fused_optimizer_step_rebuilds_the_packs(monkeypatch):
    """Fused AdamW bumps no version counter: the packs follow its step all the same (the tokens
    are a fresh copy's over plain weights), as a PPO loop's rollouts after each update need."""
    model = _model()
    prompt = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(6))
    before = fastlm.generate(model, prompt, max_new_tokens=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    after = fastlm.generate(model, prompt, max_new_tokens=8)
    monkeypatch.setattr(packed, "PACK_MAX_BYTES", 0)
    assert torch.equal(after, fastlm.generate(copy.deepcopy(model), prompt, max_new_tokens=8))
    assert not torch.equal(after, before)


@needs_packs
def test_packs_follow_linears_moved_into_a_wrapper():
    model = _model()
    with torch.no_grad():
        before = packed_linears(model, 8, weights_version(model))
        wrapped = nn.Sequential(model.layers[0].attn.o_proj)  # a wrapper keeps the same weight tensor
        model.layers[0].attn.o_proj = wrapped
        after = packed_linears(model, 8, weights_version(model))
    assert set(after) == {m for m in model.modules() if type(m) is nn.Linear} and wrapped[0] in after
    assert len(after) == len(before)


@needs_packs
def test_nothing_is_packed_where_it_does_not_apply(monkeypatch):
    model = _model()
    version = weights_version(model)
    assert packed_linears(model, 8, version) == {}, "packed with autograd on"
    with torch.no_grad():
        assert packed_linears(copy.deepcopy(model).to(torch.bfloat16), 8, version) == {}
        monkeypatch.setenv(cpu_gemm.ENV_VAR, "0")  # fastlm's kernel off too: no packed GEMM is left
        with torch.backends.mkldnn.flags(enabled=False):
            assert packed_linears(model, 8, version) == {}
        monkeypatch.delenv(cpu_gemm.ENV_VAR)
        assert packed_linears(model, 8, version) and model in packed._PACKS
        monkeypatch.setattr(packed, "PACK_MAX_BYTES", 0)
        assert packed_linears(model, 8, version) == {}
        assert model not in packed._PACKS, "packs of weights no longer packable were kept"


@needs_packs
def test_packs_are_released_and_never_keep_the_model_alive():
    model = _model()
    with torch.no_grad():
        packed_linears(model, 8, weights_version(model))
    assert model in packed._PACKS
    release_caches(model)
    assert model not in packed._PACKS
    with torch.no_grad():
        packed_linears(model, 1, weights_version(model))
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    release_packs(nn.Linear(2, 2))  # a model without packs: nothing to do
