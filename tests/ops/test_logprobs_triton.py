"""linear_logprobs and linear_distillation_loss on the Triton kernels (kernels/logprobs.py; the
interpreter on CPU): equal to the reference backend in float64, and by the 2× rule in float32
and bfloat16 — error vs the float64 truth ≤ 2 · the unfused PyTorch's error in the same dtype +
atol — for outputs and both gradients. T = 1 and 37 rows, vocabularies that are not a multiple
of the tile, several tiles per row (the tile cap is lowered), ignored rows, temperature,
entropy, every divergence."""

import math

import pytest
import torch

import fastlm
from fastlm import ops
from fastlm.ops.backend import has_kernel, kernel_module

pytest.importorskip("triton")

ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3}


def several_tiles(monkeypatch):
    """Lower the tile caps so that a row spans several tiles, the last one partial."""
    module = kernel_module("logprobs")
    monkeypatch.setattr(module, "LOGPROBS_MAX_BLOCK", 32)
    monkeypatch.setattr(module, "DISTILL_MAX_BLOCK", 64)  # V = 101, 123: two tiles


# (rows, vocabulary, several tiles): T = 1 in one tile; 37 rows over several partial tiles
SHAPES = [pytest.param(1, 37, False, id="1x37"), pytest.param(37, 123, True, id="37x123-tiled")]


def make(n, h, v, dtype, seed=0, ignore_every=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * 3 / math.sqrt(h)).to(dtype)
    tokens = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        tokens[1::ignore_every] = -100
    return hidden, weight, tokens


def run_logprobs(fn, hidden, weight, tokens, temperature, g_lp, g_ent):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = fn(h, w, tokens, temperature)
    (lp.double() * g_lp + ent.double() * g_ent).sum().backward()
    return [lp.detach(), ent.detach(), h.grad, w.grad]


def unfused_logprobs(h, w, tokens, temperature):
    """The unfused PyTorch: logits in the inputs' dtype, log_softmax in float32 (float64 for float64)."""
    z = h @ w.T
    logp = torch.log_softmax((z if z.dtype == torch.float64 else z.float()) / temperature, -1)
    valid = tokens != -100
    lp = logp.gather(-1, tokens.clamp(min=0)[:, None]).squeeze(-1) * valid
    return lp, -(logp.exp() * logp).sum(-1) * valid


def fused_logprobs(backend, chunk, softcap=None):
    def fn(h, w, tokens, temperature):
        with fastlm.use_backend(backend):
            return ops.linear_logprobs(h, w, tokens, temperature=temperature, return_entropy=True, chunk_size=chunk,
                                       softcap=softcap)
    return fn


def test_registered():
    for name in ("linear_logprobs", "linear_distillation_loss"):
        assert has_kernel(name, "triton") and has_kernel(f"{name}_backward", "triton")


@pytest.mark.parametrize("n,v,chunk,tiled,softcap", [(1, 7, None, False, None), (37, 123, 8, True, None),
                                                     (37, 100, None, False, None), (37, 123, 8, True, 2.5)])
def test_logprobs_float64_equals_reference(monkeypatch, n, v, chunk, tiled, softcap):
    if tiled:
        several_tiles(monkeypatch)
    hidden, weight, tokens = make(n, 16, v, torch.float64, ignore_every=4)
    g = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    got = run_logprobs(fused_logprobs("triton", chunk, softcap), hidden, weight, tokens, 0.7, g_lp, g_ent)
    want = run_logprobs(fused_logprobs("reference", chunk, softcap), hidden, weight, tokens, 0.7, g_lp, g_ent)
    for name, a, b in zip(("logp", "entropy", "d hidden", "d weight"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,v,tiled", SHAPES)
def test_logprobs_2x_rule(monkeypatch, dtype, n, v, tiled):
    if tiled:
        several_tiles(monkeypatch)
    hidden, weight, tokens = make(n, 16, v, dtype, ignore_every=5)
    g = torch.Generator().manual_seed(2)
    g_lp, g_ent = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    truth = run_logprobs(unfused_logprobs, hidden.double(), weight.double(), tokens, 1.3, g_lp, g_ent)
    torch_ = run_logprobs(unfused_logprobs, hidden, weight, tokens, 1.3, g_lp, g_ent)
    got = run_logprobs(fused_logprobs("triton", 16), hidden, weight, tokens, 1.3, g_lp, g_ent)
    assert got[0].dtype == torch.float32 and got[2].dtype == dtype and got[3].dtype == dtype
    for name, a, t, e in zip(("logp", "entropy", "d hidden", "d weight"), got, torch_, truth):
        ours = (a.double() - e).abs().max().item()
        theirs = (t.double() - e).abs().max().item()
        assert ours <= 2 * theirs + ATOL[dtype], f"{name}: {ours} > 2 · {theirs} + {ATOL[dtype]}"


def run_distill(fn, sh, sw, th, tw, labels, kwargs):
    h, w = sh.clone().requires_grad_(), sw.clone().requires_grad_()
    loss = fn(h, w, th, tw, labels, **kwargs)
    (loss * 1.5).backward()
    return [loss.detach(), h.grad, w.grad]


def unfused_distill(sh, sw, th, tw, labels, *, temperature, divergence, alpha, jsd_beta=0.5):
    def wide(x):
        return x if x.dtype == torch.float64 else x.float()
    zs, zt = wide(sh @ sw.T), wide(th @ tw.T)
    ls, lt = torch.log_softmax(zs / temperature, -1), torch.log_softmax(zt / temperature, -1)
    ps, pt = ls.exp(), lt.exp()
    if divergence == "forward_kl":
        d = (pt * (lt - ls)).sum(-1)
    elif divergence == "reverse_kl":
        d = (ps * (ls - lt)).sum(-1)
    else:
        lm = torch.logaddexp(lt + math.log(jsd_beta), ls + math.log1p(-jsd_beta))
        d = jsd_beta * (pt * (lt - lm)).sum(-1) + (1 - jsd_beta) * (ps * (ls - lm)).sum(-1)
    row = temperature**2 * d
    if labels is None:
        return row.mean()
    valid = labels != -100
    ce = -torch.log_softmax(zs, -1).gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    return ((alpha * row + (1 - alpha) * ce) * valid).sum() / valid.sum()


def fused_distill(backend, chunk):
    def fn(h, w, th, tw, labels, **kwargs):
        with fastlm.use_backend(backend):
            return ops.linear_distillation_loss(h, w, th, tw, labels, chunk_size=chunk, **kwargs)
    return fn


CASES = [
    dict(temperature=1.0, divergence="forward_kl", alpha=0.5),
    dict(temperature=2.0, divergence="reverse_kl", alpha=0.8),
    dict(temperature=1.5, divergence="jsd", alpha=0.3, jsd_beta=0.2),
    dict(temperature=1.0, divergence="jsd", alpha=1.0),
    dict(temperature=2.0, divergence="forward_kl", alpha=0.5, student_softcap=2.0, teacher_softcap=3.0),  # Gemma 2
]


@pytest.mark.parametrize("kwargs,labelled", [(c, True) for c in CASES] + [(CASES[1], False)],
                         ids=lambda c: f"{c['divergence']}-T{c['temperature']}-a{c['alpha']}" if isinstance(c, dict)
                         else ("labels" if c else "no-labels"))
def test_distill_float64_equals_reference(monkeypatch, kwargs, labelled):
    several_tiles(monkeypatch)
    sh, sw, labels = make(19, 12, 101, torch.float64, ignore_every=6)
    th, tw, _ = make(19, 8, 101, torch.float64, seed=3)
    labels = labels if labelled else None
    got = run_distill(fused_distill("triton", 8), sh, sw, th, tw, labels, kwargs)
    want = run_distill(fused_distill("reference", 8), sh, sw, th, tw, labels, kwargs)
    for name, a, b in zip(("loss", "d hidden", "d weight"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kwargs", CASES[:3], ids=lambda c: c["divergence"])
@pytest.mark.parametrize("n,v,tiled", SHAPES)
def test_distill_2x_rule(monkeypatch, dtype, kwargs, n, v, tiled):
    if tiled:
        several_tiles(monkeypatch)
    sh, sw, labels = make(n, 16, v, dtype, ignore_every=5)
    th, tw, _ = make(n, 8, v, dtype, seed=4)
    truth = run_distill(unfused_distill, sh.double(), sw.double(), th.double(), tw.double(), labels, kwargs)
    torch_ = run_distill(unfused_distill, sh, sw, th, tw, labels, kwargs)
    got = run_distill(fused_distill("triton", 16), sh, sw, th, tw, labels, kwargs)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    for name, a, t, e in zip(("loss", "d hidden", "d weight"), got, torch_, truth):
        ours = (a.double() - e).abs().max().item()
        theirs = (t.double() - e).abs().max().item()
        assert ours <= 2 * theirs + ATOL[dtype], f"{name}: {ours} > 2 · {theirs} + {ATOL[dtype]}"


def test_all_ignored_rows_give_zero_gradients():
    hidden, weight, tokens = make(5, 8, 11, torch.float32)
    tokens[:] = -100
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with fastlm.use_backend("triton"):
        lp, ent = ops.linear_logprobs(h, w, tokens, return_entropy=True)
        (lp.sum() + ent.sum()).backward()
        assert torch.all(lp == 0) and torch.all(ent == 0)
        assert torch.all(h.grad == 0) and torch.all(w.grad == 0)
        h.grad = w.grad = None
        loss = ops.linear_distillation_loss(h, w, hidden, weight, tokens)
        loss.backward()
    assert torch.isnan(loss) and torch.all(h.grad == 0) and torch.all(w.grad == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_gpu_bf16_2x_rule_at_model_vocabulary(divergence):
    """On CUDA (compiled kernels, several 8192/4096 tiles per row): V = 32003, 1000 rows, bf16."""
    dev = torch.device("cuda")
    hidden, weight, tokens = (t.to(dev) for t in make(1000, 256, 32003, torch.bfloat16, ignore_every=7))
    g_lp = torch.randn(1000, dtype=torch.float64, device=dev)
    g_ent = torch.randn(1000, dtype=torch.float64, device=dev)
    truth = run_logprobs(unfused_logprobs, hidden.double(), weight.double(), tokens, 0.9, g_lp, g_ent)
    torch_ = run_logprobs(unfused_logprobs, hidden, weight, tokens, 0.9, g_lp, g_ent)
    got = run_logprobs(fused_logprobs("triton", 384), hidden, weight, tokens, 0.9, g_lp, g_ent)
    for name, a, t, e in zip(("logp", "entropy", "d hidden", "d weight"), got, torch_, truth):
        ours, theirs = (a.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        assert ours <= 2 * theirs + ATOL[torch.bfloat16], f"{name}: {ours} > 2 · {theirs}"
    th, tw, _ = (t.to(dev) for t in make(1000, 128, 32003, torch.bfloat16, seed=5))
    kwargs = dict(temperature=2.0, divergence=divergence, alpha=0.5)
    truth = run_distill(unfused_distill, hidden.double(), weight.double(), th.double(), tw.double(), tokens, kwargs)
    torch_ = run_distill(unfused_distill, hidden, weight, th, tw, tokens, kwargs)
    got = run_distill(fused_distill("triton", 384), hidden, weight, th, tw, tokens, kwargs)
    for name, a, t, e in zip(("loss", "d hidden", "d weight"), got, torch_, truth):
        ours, theirs = (a.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        assert ours <= 2 * theirs + ATOL[torch.bfloat16], f"{name}: {ours} > 2 · {theirs}"
