"""fastlm.ops.linear_logprobs and linear_distillation_loss (reference backend: chunked plain
PyTorch) against explicit unfused formulas on the full logits — log_softmax(h·Wᵀ/T) — in
float64, with gradcheck on tiny shapes, ignore_index, temperature, entropy, every divergence,
TRL's generalized JSD where TRL is installed, and the errors for bad arguments.
(tests/ops/test_logprobs_triton.py runs the Triton backend against these references.)
"""

import math

import pytest
import torch

import fastlm
from fastlm import ops

F64 = torch.float64


def make(n, h, v, dtype=F64, ignored=(), seed=0, hidden_t=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=F64).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=F64) / math.sqrt(h) * 3).to(dtype).requires_grad_()
    tokens = torch.randint(0, v, (n,), generator=g)
    for i in ignored:
        tokens[i] = -100
    return hidden, weight, tokens


def explicit_logprobs(hidden, weight, tokens, temperature=1.0, ignore_index=-100):
    """The unfused formula: log_softmax of the full logits, gathered; entropy −Σ p log p."""
    logp = torch.log_softmax((hidden @ weight.T) / temperature, dim=-1)  # (N, V)
    valid = tokens != ignore_index
    lp = logp.gather(-1, tokens.clamp(min=0)[:, None]).squeeze(-1) * valid
    ent = -(logp.exp() * logp).sum(-1) * valid
    return lp, ent


def explicit_distill(sh, sw, th, tw, labels, temperature, divergence, beta, alpha, ignore_index=-100):
    ls = torch.log_softmax(sh @ sw.T / temperature, -1)
    lt = torch.log_softmax(th @ tw.T / temperature, -1)
    ps, pt = ls.exp(), lt.exp()
    if divergence == "forward_kl":
        d = (pt * (lt - ls)).sum(-1)
    elif divergence == "reverse_kl":
        d = (ps * (ls - lt)).sum(-1)
    else:
        m = beta * pt + (1 - beta) * ps
        d = beta * (pt * (pt.log() - m.log())).sum(-1) + (1 - beta) * (ps * (ps.log() - m.log())).sum(-1)
    row = temperature**2 * d
    if labels is None:
        return row.mean()
    valid = labels != ignore_index
    ce = -torch.log_softmax(sh @ sw.T, -1).gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    row = alpha * row + (1 - alpha) * ce
    return (row * valid).sum() / valid.sum()


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("chunk", [1, 3, None])
def test_logprobs_match_explicit(temperature, chunk):
    hidden, weight, tokens = make(7, 5, 13, ignored=(2, 6))
    lp, ent = ops.linear_logprobs(hidden, weight, tokens, temperature=temperature, return_entropy=True,
                                  chunk_size=chunk)
    lp_ref, ent_ref = explicit_logprobs(hidden, weight, tokens, temperature)
    assert lp.dtype == F64 and lp.shape == (7,)
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, ent_ref, rtol=0, atol=1e-12)
    assert lp[2] == 0 and ent[6] == 0
    g_lp, g_ent = torch.randn(7, dtype=F64), torch.randn(7, dtype=F64)
    got = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), (hidden, weight))
    want = torch.autograd.grad((lp_ref * g_lp).sum() + (ent_ref * g_ent).sum(), (hidden, weight))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_logprobs_without_entropy_and_float32():
    hidden, weight, tokens = make(37, 16, 50, dtype=torch.float32)
    lp = ops.linear_logprobs(hidden, weight, tokens, chunk_size=8)
    assert lp.dtype == torch.float32 and lp.shape == (37,)
    lp_ref, _ = explicit_logprobs(hidden.double(), weight.double(), tokens)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=0, atol=2e-5)
    lp.sum().backward()
    ref_h, ref_w = torch.autograd.grad(lp_ref.sum(), (hidden, weight))
    torch.testing.assert_close(hidden.grad.double(), ref_h.double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), ref_w.double(), rtol=0, atol=1e-5)


def test_logprobs_gradcheck():
    hidden, weight, tokens = make(5, 3, 7, ignored=(1,))
    fn = lambda h, w: ops.linear_logprobs(h, w, tokens, temperature=0.8, return_entropy=True, chunk_size=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight))
    fn1 = lambda h, w: ops.linear_logprobs(h, w, tokens, chunk_size=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn1, (hidden, weight))


def test_logprobs_custom_ignore_index_only_hidden_grad_and_tied():
    hidden, weight, tokens = make(6, 4, 9)
    tokens[0] = 3  # ignore_index=3 ignores token 3 wherever it appears
    lp = ops.linear_logprobs(hidden, weight.detach(), tokens, ignore_index=3)
    assert lp[0] == 0
    lp.sum().backward()
    assert hidden.grad is not None and torch.all(hidden.grad[tokens == 3] == 0)
    # Tied: the same weight used as embedding and head gets both gradients.
    emb = weight.detach().clone().requires_grad_()
    ids = torch.randint(0, 9, (6,))
    lp = ops.linear_logprobs(emb[ids] * 2, emb, tokens, ignore_index=3)
    lp_ref, _ = explicit_logprobs(emb[ids] * 2, emb, tokens, ignore_index=3)
    (g,) = torch.autograd.grad(lp.sum(), emb)
    (g_ref,) = torch.autograd.grad(lp_ref.sum(), emb)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)


def test_opcheck():
    hidden, weight, tokens = make(5, 4, 11, dtype=torch.float32, ignored=(0,))
    torch.library.opcheck(torch.ops.fastlm.linear_logprobs.default,
                          (hidden, weight, tokens, 1.3, -100, True, 2, 0.0, "reference"))
    torch.library.opcheck(torch.ops.fastlm.linear_logprobs.default,
                          (hidden, weight, tokens, 1.3, -100, True, 2, 1.5, "reference"))
    th, tw, _ = make(5, 3, 11, dtype=torch.float32, seed=1)
    torch.library.opcheck(torch.ops.fastlm.linear_distillation_loss.default,
                          (hidden, weight, th.detach(), tw.detach(), tokens, 2.0, "jsd", 0.4, 0.5, -100, 2, True, True,
                           0.0, 0.0, "reference"))
    torch.library.opcheck(torch.ops.fastlm.linear_distillation_loss.default,
                          (hidden, weight, th.detach(), tw.detach(), tokens, 2.0, "forward_kl", 0.5, 0.5, -100, 2, True,
                           True, 1.5, 3.0, "reference"))


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 0.0), (0.5, 1.0)])
def test_distillation_matches_explicit(divergence, temperature, alpha):
    sh, sw, labels = make(9, 6, 17, ignored=(3,))
    th, tw, _ = make(9, 4, 17, seed=1)
    th, tw = th.detach(), tw.detach()
    loss = ops.linear_distillation_loss(sh, sw, th, tw, labels, temperature=temperature, divergence=divergence,
                                        jsd_beta=0.3, alpha=alpha, chunk_size=4)
    ref = explicit_distill(sh, sw, th, tw, labels, temperature, divergence, 0.3, alpha)
    assert loss.dtype == F64 and loss.shape == ()
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-12)
    got = torch.autograd.grad(loss * 1.7, (sh, sw))
    want = torch.autograd.grad(ref * 1.7, (sh, sw))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_distillation_without_labels_and_gradcheck():
    sh, sw, _ = make(5, 3, 8)
    th, tw, _ = make(5, 2, 8, seed=2)
    th, tw = th.detach(), tw.detach()
    loss = ops.linear_distillation_loss(sh, sw, th, tw, temperature=1.5, divergence="reverse_kl", alpha=0.2)
    torch.testing.assert_close(loss, explicit_distill(sh, sw, th, tw, None, 1.5, "reverse_kl", 0.5, 1.0),
                               rtol=0, atol=1e-12)
    for div in ("forward_kl", "reverse_kl", "jsd"):
        fn = lambda h, w: ops.linear_distillation_loss(h, w, th, tw, torch.tensor([1, -100, 2, 3, 7]),  # noqa: E731
                                                       temperature=1.5, divergence=div, alpha=0.6, chunk_size=2)
        assert torch.autograd.gradcheck(fn, (sh, sw))


def test_distillation_identical_models_is_zero_and_all_ignored_is_nan():
    sh, sw, labels = make(4, 3, 6)
    for div in ("forward_kl", "reverse_kl", "jsd"):
        loss = ops.linear_distillation_loss(sh, sw, sh.detach(), sw.detach(), divergence=div)
        assert abs(loss.item()) < 1e-12
    labels[:] = -100
    loss = ops.linear_distillation_loss(sh, sw, sh.detach(), sw.detach(), labels)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.all(sh.grad == 0) and torch.all(sw.grad == 0)


def test_distillation_jsd_matches_trl():
    trl = pytest.importorskip("trl")
    from trl.experimental.gkd import GKDTrainer  # noqa: F401  (TRL >= 0.2x keeps GKD under experimental)

    sh, sw, labels = make(8, 5, 12, ignored=(4,))
    th, tw, _ = make(8, 3, 12, seed=3)
    for beta in (0.1, 0.5, 0.9):
        for temperature in (1.0, 2.0):
            ours = ops.linear_distillation_loss(sh, sw, th.detach(), tw.detach(), labels, temperature=temperature,
                                                divergence="jsd", jsd_beta=beta, alpha=1.0)
            theirs = GKDTrainer.generalized_jsd_loss((sh @ sw.T)[None], (th @ tw.T)[None], labels[None], beta=beta,
                                                     temperature=temperature, reduction="batchmean")
            # TRL does not scale by T²; its batchmean divides by the number of labelled tokens.
            torch.testing.assert_close(ours / temperature**2, theirs, rtol=1e-10, atol=1e-12)
    del trl


def test_errors_name_the_argument():
    hidden, weight, tokens = make(4, 3, 6)
    with pytest.raises(ValueError, match="hidden of shape"):
        ops.linear_logprobs(hidden[None], weight, tokens)
    with pytest.raises(ValueError, match="must share H"):
        ops.linear_logprobs(hidden, weight[:, :2], tokens)
    with pytest.raises(TypeError, match="tokens"):
        ops.linear_logprobs(hidden, weight, tokens.int())
    with pytest.raises(ValueError, match="tokens of shape"):
        ops.linear_logprobs(hidden, weight, tokens[:3])
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        ops.linear_logprobs(hidden, weight, torch.tensor([0, 1, 6, 2]))
    with pytest.raises(ValueError, match="temperature"):
        ops.linear_logprobs(hidden, weight, tokens, temperature=0.0)
    with pytest.raises(TypeError, match="dtype|float"):
        ops.linear_logprobs(hidden, weight.float(), tokens)
    with pytest.raises(ValueError, match="chunk_size"):
        ops.linear_logprobs(hidden, weight, tokens, chunk_size=0)
    th, tw, _ = make(4, 2, 6, seed=1)
    with pytest.raises(ValueError, match="divergence"):
        ops.linear_distillation_loss(hidden, weight, th, tw, divergence="kl")
    with pytest.raises(ValueError, match="jsd_beta"):
        ops.linear_distillation_loss(hidden, weight, th, tw, divergence="jsd", jsd_beta=1.0)
    with pytest.raises(ValueError, match="alpha"):
        ops.linear_distillation_loss(hidden, weight, th, tw, tokens, alpha=1.5)
    with pytest.raises(ValueError, match="shared tokenizer"):
        ops.linear_distillation_loss(hidden, weight, th, tw[:5])
    with pytest.raises(ValueError, match="rows"):
        ops.linear_distillation_loss(hidden, weight, th[:3], tw)
    with pytest.raises(ValueError, match="labels of shape"):
        ops.linear_distillation_loss(hidden, weight, th, tw, tokens[:2])


def test_forced_backend_without_kernel_is_an_error_not_a_fallback():
    hidden, weight, tokens = make(4, 3, 6)
    with pytest.raises((fastlm.ops.BackendUnavailableError, NotImplementedError)):
        with fastlm.use_backend("cuda"):
            ops.linear_logprobs(hidden, weight, tokens)


# ---- logit soft-cap (Gemma 2: z <- c·tanh(z / c)) ------------------------------------------------


def _capped(hidden, weight, cap):
    z = hidden @ weight.T
    return z if cap is None else cap * torch.tanh(z / cap)


def test_logprobs_with_softcap_match_the_capped_formula():
    hidden, weight, tokens = make(7, 5, 13, ignored=(2,))
    cap = 1.5  # |z| reaches ~3·|h|: the cap bends most logits
    lp, ent = ops.linear_logprobs(hidden, weight, tokens, temperature=0.8, return_entropy=True, chunk_size=3,
                                  softcap=cap)
    logp = torch.log_softmax(_capped(hidden, weight, cap) / 0.8, -1)
    valid = tokens != -100
    want_lp = logp.gather(-1, tokens.clamp(min=0)[:, None]).squeeze(-1) * valid
    want_ent = -(logp.exp() * logp).sum(-1) * valid
    torch.testing.assert_close(lp, want_lp, rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, want_ent, rtol=0, atol=1e-12)
    got = torch.autograd.grad((lp * 1.3).sum() + (ent * 0.4).sum(), (hidden, weight))
    want = torch.autograd.grad((want_lp * 1.3).sum() + (want_ent * 0.4).sum(), (hidden, weight))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    uncapped = ops.linear_logprobs(hidden, weight, tokens, temperature=0.8)
    assert not torch.allclose(uncapped, lp)  # the cap mattered
    fn = lambda h, w: ops.linear_logprobs(h, w, tokens, return_entropy=True, chunk_size=2, softcap=2.0)  # noqa: E731
    small = make(4, 3, 6, seed=4)
    tokens = small[2]
    assert torch.autograd.gradcheck(fn, small[:2])


@pytest.mark.parametrize("student_cap,teacher_cap", [(1.5, None), (None, 2.0), (2.5, 1.0)])
def test_distillation_with_softcaps_matches_the_capped_formula(student_cap, teacher_cap):
    sh, sw, labels = make(9, 6, 17, ignored=(3,))
    th, tw, _ = make(9, 4, 17, seed=1)
    th, tw = th.detach(), tw.detach()
    loss = ops.linear_distillation_loss(sh, sw, th, tw, labels, temperature=2.0, divergence="forward_kl", alpha=0.4,
                                        chunk_size=4, student_softcap=student_cap, teacher_softcap=teacher_cap)
    zs, zt = _capped(sh, sw, student_cap), _capped(th, tw, teacher_cap)
    ls, lt = torch.log_softmax(zs / 2.0, -1), torch.log_softmax(zt / 2.0, -1)
    valid = labels != -100
    ce = -torch.log_softmax(zs, -1).gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    rows = 0.4 * 4.0 * (lt.exp() * (lt - ls)).sum(-1) + 0.6 * ce
    want = (rows * valid).sum() / valid.sum()
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-12)
    got = torch.autograd.grad(loss * 1.7, (sh, sw))
    ref = torch.autograd.grad(want * 1.7, (sh, sw))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_bad_softcaps_are_refused():
    hidden, weight, tokens = make(4, 3, 6)
    for bad in (0.0, -1.0, float("inf"), True, "2"):
        with pytest.raises(ValueError, match="softcap must be None"):
            ops.linear_logprobs(hidden, weight, tokens, softcap=bad)
    with pytest.raises(ValueError, match="teacher_softcap"):
        ops.linear_distillation_loss(hidden, weight, hidden.detach(), weight.detach(), teacher_softcap=0)
