"""fastlm.ops.linear_preference_loss (fastlm/ops/preference.py): the fused, pair-chunked DPO /
IPO / SimPO loss against the unfused formula — full float64 logits, log_softmax, sequence sums
over the completion mask, then fastlm.align.dpo's dpo_loss / simpo_loss — for the loss, the
per-pair outputs and both gradients; odd shapes (T = 1 and 37, V not a power of 2, chunk sizes
that do not divide the pairs), ignored tokens, temperature, label smoothing; bfloat16 by the 2×
rule; the Triton backend (interpreter) against the reference; and every bad input.
(TRL parity of the loss is in tests/align/test_dpo.py, next to dpo_loss's.)"""

from __future__ import annotations

import math

import pytest
import torch

import fastlm
from fastlm import ops
from fastlm.align.dpo import dpo_loss, simpo_loss

IGNORE = -100


def make(p, t, h, v, dtype=torch.float64, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * p * t, h, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * 3 / math.sqrt(h)).to(dtype)
    tokens = torch.randint(0, v, (2 * p, t), generator=g)
    mask = (torch.rand(2 * p, t, generator=g) > 0.3).long()
    mask[:, -1] = 1  # at least one scored position per sequence
    if ignore and t > 1:
        tokens[0, 0] = IGNORE
        tokens[-1, 1:3] = IGNORE
    ref = -torch.rand(p, 2, generator=g, dtype=torch.float64) * 3 * t
    return hidden, weight, tokens, mask, ref


def pair_logps(logp, tokens, mask, loss):
    """logp (2P, T, V) token log-probs -> (chosen, rejected) (P,) sequence log-probs over the
    completion mask (ignored tokens dropped), averaged per token except for the sigmoid loss."""
    keep = (tokens != IGNORE) & (mask != 0)
    picked = logp.gather(-1, torch.where(keep, tokens, 0).reshape(-1, 1)).view(tokens.shape)
    seq = (picked * keep).sum(1)
    if loss != "sigmoid":
        seq = seq / keep.sum(1).clamp(min=1)
    return seq.chunk(2)


def unfused(hidden, weight, tokens, mask, ref, *, loss, beta, gamma=0.5, label_smoothing=0.0, temperature=1.0,
            softcap=None):
    """(losses, chosen rewards, rejected rewards, chosen logps, rejected logps) from the full logits."""
    z = hidden.double() @ weight.double().t()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z / temperature, -1)
    c, r = pair_logps(logp, tokens, mask, loss)
    if loss == "simpo":
        out = simpo_loss(c, r, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    else:
        out = dpo_loss(c, r, ref[:, 0], ref[:, 1], beta=beta, loss_type=loss, label_smoothing=label_smoothing)
    return (*out, c, r)


CONFIGS = [
    pytest.param("sigmoid", dict(beta=0.1), id="sigmoid"),
    pytest.param("sigmoid", dict(beta=0.5, label_smoothing=0.2, temperature=0.7), id="sigmoid-smoothed-T0.7"),
    pytest.param("ipo", dict(beta=0.3), id="ipo"),
    pytest.param("sigmoid", dict(beta=0.2, softcap=2.0, temperature=0.9), id="sigmoid-softcap"),
    pytest.param("simpo", dict(beta=2.0, gamma=0.7), id="simpo"),
    pytest.param("simpo", dict(beta=2.5, gamma=0.3, label_smoothing=0.1, temperature=1.3), id="simpo-smoothed"),
]
# (pairs, T, V, chunk in pairs): T = 1; T = 37 with 3 pairs in chunks of 2 (not a divisor); V not a power of 2
SHAPES = [pytest.param(1, 1, 37, None, id="P1-T1-V37"), pytest.param(3, 37, 123, 2, id="P3-T37-V123-chunk2"),
          pytest.param(4, 5, 50, 3, id="P4-T5-V50-chunk3")]


@pytest.mark.parametrize("p,t,v,chunk", SHAPES)
@pytest.mark.parametrize("loss,kw", CONFIGS)
def test_equals_unfused_formula_float64(loss, kw, p, t, v, chunk):
    hidden, weight, tokens, mask, ref = make(p, t, 16, v)
    hidden.requires_grad_()
    weight.requires_grad_()
    ref_in = None if loss == "simpo" else ref
    out = ops.linear_preference_loss(hidden, weight, tokens, mask, ref_in, loss=loss, chunk_size=chunk, **kw)
    expected = unfused(hidden, weight, tokens, mask, ref, loss=loss, **kw)
    torch.testing.assert_close(out.loss, expected[0].sum(), rtol=1e-10, atol=1e-12)
    for got, want in zip(out[1:], expected):
        torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
    grad = torch.tensor(0.37, dtype=torch.float64)  # an incoming grad ≠ 1: backward scales the saved gradients
    got = torch.autograd.grad(out.loss, (hidden, weight), grad)
    want = torch.autograd.grad(expected[0].sum(), (hidden, weight), grad)
    for g, w, name in zip(got, want, ("hidden", "weight")):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=f"d {name}")


def test_hidden_3d_and_gradient_of_one_input_only():
    hidden, weight, tokens, mask, ref = make(2, 4, 8, 19)
    flat = ops.linear_preference_loss(hidden, weight, tokens, mask, ref).loss
    three = ops.linear_preference_loss(hidden.view(4, 4, 8), weight, tokens, mask, ref).loss
    torch.testing.assert_close(three, flat)
    w = weight.clone().requires_grad_()
    (dw,) = torch.autograd.grad(ops.linear_preference_loss(hidden, w, tokens, mask, ref).loss, w)
    hh, ww = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (dw_both,) = torch.autograd.grad(ops.linear_preference_loss(hh, ww, tokens, mask, ref).loss, ww)
    torch.testing.assert_close(dw, dw_both)
    with torch.no_grad():  # no gradient computed (and none needed)
        out = ops.linear_preference_loss(hh, ww, tokens, mask, ref)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, flat)


def test_sequence_with_nothing_scored_gives_zero_logps_and_finite_gradients():
    hidden, weight, tokens, mask, ref = make(2, 3, 8, 11)
    mask[1] = 0  # chosen sequence of pair 1: no completion token
    tokens[2] = IGNORE  # rejected sequence of pair 0: every target ignored
    hidden.requires_grad_()
    for loss in ("sigmoid", "ipo"):
        out = ops.linear_preference_loss(hidden, weight, tokens, mask, ref, loss=loss, beta=0.2)
        assert out.chosen_logps[1] == 0 and out.rejected_logps[0] == 0
        (dh,) = torch.autograd.grad(out.loss, hidden)
        assert torch.isfinite(dh).all()
        assert (dh.view(4, 3, 8)[1] == 0).all() and (dh.view(4, 3, 8)[2] == 0).all()


@pytest.mark.parametrize("loss", ["sigmoid", "simpo"])
def test_bfloat16_2x_rule(loss):
    """The bfloat16 reference path (float32 row math, gradients in bfloat16) is at most 2× as far
    from the float64 truth as the unfused PyTorch path in bfloat16 (logits in bfloat16, loss in
    float32, as transformers computes it) — loss and both gradients."""
    h64, w64, tokens, mask, ref = make(3, 9, 32, 77, seed=4)
    kw = dict(beta=0.5) if loss == "sigmoid" else dict(beta=2.0, gamma=0.5)
    ref_in = None if loss == "simpo" else ref.float()

    def grads(fn, dtype):
        h, w = h64.to(dtype).requires_grad_(), w64.to(dtype).requires_grad_()
        value = fn(h, w)
        return (value.double(), *(g.double() for g in torch.autograd.grad(value, (h, w))))

    truth = grads(lambda h, w: unfused(h, w, tokens, mask, ref, loss=loss, **kw)[0].sum(), torch.float64)

    def torch_bf16(h, w):
        logp = torch.log_softmax((h @ w.t()).float(), -1)
        c, r = pair_logps(logp, tokens, mask, loss)
        if loss == "simpo":
            return simpo_loss(c, r, **kw)[0].sum()
        return dpo_loss(c, r, ref_in[:, 0], ref_in[:, 1], **kw)[0].sum()

    baseline = grads(torch_bf16, torch.bfloat16)
    got = grads(lambda h, w: ops.linear_preference_loss(h, w, tokens, mask, ref_in, loss=loss, chunk_size=2, **kw).loss,
                torch.bfloat16)
    for g, b, t, name in zip(got, baseline, truth, ("loss", "d hidden", "d weight")):
        bound = 2 * (b - t).abs().max() + 1e-3
        assert (g - t).abs().max() <= bound, f"{name}: {float((g - t).abs().max()):.3g} > {float(bound):.3g}"


def test_triton_backend_equals_reference():
    """The triton backend (kernels/logprobs.py's row kernels, under the interpreter here) against
    the reference: float64 to rounding, float32 by the 2× rule; loss, per-pair outputs, gradients."""
    pytest.importorskip("triton")
    if not ops.backend_status("triton", "cpu")[0]:
        pytest.skip(f"triton cannot run here: {ops.backend_status('triton', 'cpu')[1]}")
    for dtype in (torch.float64, torch.float32):
        hidden, weight, tokens, mask, ref = make(2, 3, 8, 37, seed=5)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        outs = {}
        for backend in ("reference", "triton"):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            with fastlm.use_backend(backend):
                out = ops.linear_preference_loss(h, w, tokens, mask, ref.to(dtype), beta=0.4, label_smoothing=0.1,
                                                 temperature=0.8, chunk_size=1)
            outs[backend] = (*out, *torch.autograd.grad(out.loss, (h, w)))
        h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
        exp = unfused(h, w, tokens, mask, ref, loss="sigmoid", beta=0.4, label_smoothing=0.1, temperature=0.8)
        truth = (exp[0].sum().detach(), *(e.detach() for e in exp), *torch.autograd.grad(exp[0].sum(), (h, w)))
        for got, ref_out, t in zip(outs["triton"], outs["reference"], truth):
            if dtype == torch.float64:
                torch.testing.assert_close(got, ref_out, rtol=1e-10, atol=1e-12)
            else:
                assert (got.double() - t).abs().max() <= 2 * (ref_out.double() - t).abs().max() + 1e-6


def test_bad_inputs_raise_clear_errors():
    hidden, weight, tokens, mask, ref = make(2, 3, 8, 11)
    f = ops.linear_preference_loss
    with pytest.raises(ValueError, match="even, nonzero number of sequences"):
        f(hidden[:9], weight, tokens[:3], mask[:3], ref)
    with pytest.raises(ValueError, match="2P·T"):
        f(hidden[:-1], weight, tokens, mask, ref)
    with pytest.raises(ValueError, match="mask of tokens' shape"):
        f(hidden, weight, tokens, mask[:, :2], ref)
    with pytest.raises(TypeError, match="mask must be bool or integer"):
        f(hidden, weight, tokens, mask.double(), ref)
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        f(hidden, weight, tokens, mask * 2, ref)
    with pytest.raises(ValueError, match=r"ref_logps of shape \(P=2, 2\)"):
        f(hidden, weight, tokens, mask, ref[:, 0])
    with pytest.raises(ValueError, match="needs ref_logps"):
        f(hidden, weight, tokens, mask, None)
    with pytest.raises(ValueError, match="reference-free"):
        f(hidden, weight, tokens, mask, ref, loss="simpo")
    with pytest.raises(ValueError, match="loss must be one of sigmoid, ipo, simpo"):
        f(hidden, weight, tokens, mask, ref, loss="hinge")
    for beta in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="beta must be a finite number > 0"):
            f(hidden, weight, tokens, mask, ref, beta=beta)
    with pytest.raises(ValueError, match="label_smoothing"):
        f(hidden, weight, tokens, mask, ref, label_smoothing=0.5)
    with pytest.raises(ValueError, match="not ipo"):
        f(hidden, weight, tokens, mask, ref, loss="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="tokens must be in"):
        f(hidden, weight, tokens.clamp(max=11) + 1, mask, ref)
    with pytest.raises(ValueError, match="tokens of shape"):
        f(hidden, weight, tokens.reshape(-1), mask, ref)
    with pytest.raises(ValueError, match="chunk_size"):
        f(hidden, weight, tokens, mask, ref, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        f(hidden, weight, tokens, mask, ref, temperature=0.0)
    with pytest.raises(ValueError, match="softcap must be None"):
        f(hidden, weight, tokens, mask, ref, softcap=0.0)
    with pytest.raises(ValueError, match="must share H"):
        f(hidden, weight[:, :4], tokens, mask, ref)


def test_no_host_reads_with_validate_false():
    """Forward and backward read nothing back to the host (the trainer passes validate=False)."""
    from tests.host_reads import HostReads

    hidden, weight, tokens, mask, ref = make(3, 4, 8, 19)
    hidden.requires_grad_()
    weight.requires_grad_()
    with HostReads() as reads:
        out = ops.linear_preference_loss(hidden, weight, tokens, mask, ref, chunk_size=2, validate=False)
        out.loss.backward()
    assert reads.count == 0, reads.where
