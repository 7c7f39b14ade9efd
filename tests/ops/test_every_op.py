"""One test walks every op defined with fastlm.ops.registry.define_op — found in the registry,
not a hand list: an op without a case and an explicit formula here fails
``test_every_defined_op_has_a_case_and_a_formula``.

For each op: ``torch.library.opcheck`` of ``fastlm::<op>``; the fake against the real output
shapes and dtypes; the reference against an explicit float64 formula written independently
(loops, merged weights, complex rotation, PyTorch's own functions); gradients where
differentiable (gradcheck in float64, through the custom op and through the eager
autograd.Function path of the kernel backends); and each registered kernel that can run here
(triton under the interpreter, small shapes) against the reference by the 2× rule.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.ops import backend, registry
from fastlm.ops.registry import _DEFINED, _KernelFunction

DEFINED = registry.defined_ops()


def _d(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + sum(shape)))


# ---- cases: the op's arguments (without backend), floating tensors in float64 ----------------------


def _attention_cases():
    q, k, v = _d(2, 2, 2, 8), _d(2, 1, 3, 8, seed=1), _d(2, 1, 3, 8, seed=2)  # GQA, Tq < Tk
    return [
        (q, k, v, False, None, None, None, None),
        (q, k, v, True, 0.7, torch.tensor([3, 0]), None, None),  # padding + a fully masked sequence
        (q, k, v, True, None, torch.tensor([3, 2]), 2, 1.5),  # sliding window + soft-cap
    ]


def _varlen_cases():
    cu_q, cu_k = torch.tensor([0, 1, 3], dtype=torch.int32), torch.tensor([0, 2, 5], dtype=torch.int32)
    q, k, v = _d(3, 2, 8), _d(5, 1, 8, seed=1), _d(5, 1, 8, seed=2)
    return [(q, k, v, cu_q, cu_k, 2, 3, True, None, None, None), (q, k, v, cu_q, cu_k, 2, 3, True, 0.5, 2, 2.0)]


def _decode_cases():
    q, kc, vc = _d(2, 2, 2, 8), _d(2, 1, 5, 8, seed=1), _d(2, 1, 5, 8, seed=2)
    return [(q, kc, vc, torch.tensor([3, 5]), None, None, None), (q, kc, vc, torch.tensor([1, 5]), 0.5, 2, 1.5)]


def _paged_cases():
    q, kp, vp = _d(2, 2, 1, 8), _d(5, 1, 2, 8, seed=1), _d(5, 1, 2, 8, seed=2)
    table = torch.tensor([[3, 0, -1], [1, 4, 2]], dtype=torch.int32)
    return [(q, kp, vp, table, torch.tensor([3, 6]), None, None, None), (q, kp, vp, table, torch.tensor([3, 6]), None, 3, 2.0)]


def _rope_append_cases():
    q, k, v = _d(2, 2, 2, 8), _d(2, 1, 2, 8, seed=1), _d(2, 1, 2, 8, seed=2)
    pos = torch.tensor([[0, 1], [4, 2]])
    caches = (torch.zeros(2, 1, 6, 8, dtype=torch.float64), torch.zeros(2, 1, 6, 8, dtype=torch.float64))
    return [(q, k, v, pos, *caches, 500.0), (q, k, v, pos, *(c.clone() for c in caches), None)]


def _quantized(out_f=6, in_f=8):
    w = _d(out_f, in_f, seed=3)
    s = w.float().abs().amax(1) / 127
    return torch.round(w.float() / s[:, None]).to(torch.int8), s


def _sample_cases():
    logits = _d(3, 7) * 2
    u = torch.tensor([0.1, 0.5, 0.93], dtype=torch.float64)
    ones, k_off = torch.ones(3, dtype=torch.float32), torch.full((3,), 7, dtype=torch.int64)
    return [(logits, u, torch.tensor([1.0, 0.0, 1.0]), k_off, ones, torch.zeros(3))]


CASES = {
    "attention": _attention_cases,
    "attention_varlen": _varlen_cases,
    "decode_attention": _decode_cases,
    "decode_attention_paged": _paged_cases,
    "rms_norm": lambda: [(_d(3, 2, 6), _d(6, seed=1), 1e-6)],
    "layer_norm": lambda: [(_d(3, 2, 6), _d(6, seed=1), _d(6, seed=2), 1e-5)],
    "rope": lambda: [(_d(1, 2, 3, 8), torch.arange(3), 10000.0),
                     (_d(2, 1, 3, 8), torch.tensor([[0, 1, 2], [7, 8, 9]]), 500.0)],
    "rope_append_kv": _rope_append_cases,
    "swiglu": lambda: [(_d(3, 5), _d(3, 5, seed=1))],
    "gelu": lambda: [(_d(3, 5) * 3,)],
    "cross_entropy": lambda: [(_d(4, 7), torch.tensor([1, -100, 6, 0]), -100)],
    "lora_linear": lambda: [(_d(3, 8), _d(4, 8, seed=1), _d(2, 8, seed=2), _d(4, 2, seed=3), 0.5, _d(4, seed=4)),
                            (_d(3, 8), _d(4, 8, seed=1), _d(2, 8, seed=2), _d(4, 2, seed=3), 2.0, None)],
    "lora_linear_mixed": lambda: [(_d(3, 8), _d(4, 8, seed=1), _d(2, 2, 8, seed=2), _d(2, 4, 2, seed=3),
                                   torch.tensor([0.5, 2.0]), torch.tensor([0, -1, 1]), _d(4, seed=4))],
    "quantize_int8": lambda: [(_d(6, 8).float(),)],
    "int8_linear": lambda: [(_d(3, 8), *_quantized(), _d(6, seed=4))],
    "quantize_per_token": lambda: [(_d(4, 8).float(), None), (_d(4, 8).float(), _d(8, seed=1).float().abs() + 0.5)],
    "w8a8_linear": lambda: [(_d(4, 8).float(), *_quantized(), _d(6, seed=4).float(), None)],
    "sample": _sample_cases,
    "fused_linear_cross_entropy": lambda: [(_d(3, 4), _d(5, 4, seed=1), torch.tensor([1, -100, 4]), -100, 2,
                                            True, True)],
    "linear_logprobs": lambda: [(_d(3, 4), _d(5, 4, seed=1), torch.tensor([1, -100, 4]), 0.7, -100, True, 2, 0.0),
                                (_d(3, 4), _d(5, 4, seed=1), torch.tensor([0, 2, 4]), 1.0, -100, False, 8, 0.0),
                                (_d(3, 4), _d(5, 4, seed=1), torch.tensor([0, 2, 4]), 0.8, -100, True, 2, 1.5)],
    "linear_distillation_loss": lambda: [
        (_d(3, 4), _d(5, 4, seed=1), _d(3, 6, seed=2), _d(5, 6, seed=3), torch.tensor([1, -100, 4]), 2.0,
         divergence, 0.3, 0.6, -100, 2, True, True, 0.0, 0.0) for divergence in ("forward_kl", "reverse_kl", "jsd")
    ] + [(_d(3, 4), _d(5, 4, seed=1), _d(3, 6, seed=2), _d(5, 6, seed=3), None, 1.0, "forward_kl", 0.5, 0.5, -100,
          8, True, True, 0.0, 0.0),
         (_d(3, 4), _d(5, 4, seed=1), _d(3, 6, seed=2), _d(5, 6, seed=3), torch.tensor([1, -100, 4]), 2.0,
          "forward_kl", 0.5, 0.6, -100, 2, True, True, 1.5, 2.5)],  # soft-capped student and teacher
    "linear_preference_loss": lambda: [  # 2 pairs of T = 2: sigmoid (smoothed, T = 0.7, 1 pair/chunk), ipo, simpo
        (_d(8, 4), _d(5, 4, seed=1), torch.tensor([[1, -100], [4, 0], [2, 3], [0, 1]]),
         torch.tensor([[1, 1], [0, 1], [1, 1], [1, 0]]), ref, loss, 0.5, 0.3, eps, temp, -100, 1, cap, True, True)
        for loss, ref, eps, temp, cap in (("sigmoid", _d(2, 2, seed=2), 0.1, 0.7, 0.0),
                                          ("ipo", _d(2, 2, seed=2), 0.0, 1.0, 1.5), ("simpo", None, 0.2, 1.0, 0.0))],
}


# ---- explicit formulas (float64), independent of the references ---------------------------------


def _attend_rows(q, k, v, visible, scale, softcap=None):
    """Textbook attention, one (batch, head, query) at a time. visible(b, i, j) -> bool."""
    b, h, tq, d = q.shape
    group = h // k.shape[1]
    out = torch.zeros(b, h, tq, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kv = hi // group
            for i in range(tq):
                keys = [j for j in range(k.shape[2]) if visible(bi, i, j)]
                if not keys:
                    continue
                s = torch.stack([q[bi, hi, i].double() @ k[bi, kv, j].double() * scale for j in keys])
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                p = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
                out[bi, hi, i] = sum(p[n] * v[bi, kv, j].double() for n, j in enumerate(keys))
    return out


def f_attention(q, k, v, causal, scale, key_lens, window, softcap):
    tq, tk = q.shape[2], k.shape[2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale

    def visible(b, i, j):
        p = i + tk - tq
        return ((not causal or j <= p) and (window is None or j > p - window)
                and (key_lens is None or j < int(key_lens[b])))

    return _attend_rows(q, k, v, visible, scale, softcap)


def f_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal, scale, window, softcap):
    out = torch.zeros(q.shape, dtype=torch.float64)
    for s in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        per = [t[a:e].transpose(0, 1)[None] for t, a, e in ((q, qs, qe), (k, ks, ke), (v, ks, ke))]
        out[qs:qe] = f_attention(*per, causal, scale, None, window, softcap)[0].transpose(0, 1)
    return out


def f_decode_attention(q, kc, vc, lens, scale, window, softcap):
    tq = q.shape[2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale

    def visible(b, t, j):
        p = int(lens[b]) - tq + t
        return j <= p and (window is None or j > p - window)

    return _attend_rows(q, kc, vc, visible, scale, softcap)


def f_decode_attention_paged(q, kp, vp, table, lens, scale, window, softcap):
    bs = kp.shape[2]
    caches = []
    for pages in (kp, vp):
        cache = torch.zeros(q.shape[0], kp.shape[1], table.shape[1] * bs, kp.shape[3], dtype=torch.float64)
        for b in range(q.shape[0]):
            for p in range(int(lens[b])):
                cache[b, :, p] = pages[int(table[b, p // bs]), :, p % bs]
        caches.append(cache)
    return f_decode_attention(q, *caches, lens, scale, window, softcap)


def _rotate(x, positions, theta):
    """RoPE as a complex rotation of the pairs (x_i, x_{i+D/2}) by angle p·theta^(-2i/D)."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[..., None] * freqs  # (T, D/2) or (B, T, D/2)
    if positions.dim() == 2:
        angles = angles[:, None]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double()) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((z.real, z.imag), dim=-1)


def f_rope_append_kv(q, k, v, positions, k_cache, v_cache, theta):
    """-> (rope(q) or empty, the caches after the write)."""
    kc, vc = k_cache.clone().double(), v_cache.clone().double()
    k_rot = k.double() if theta is None else _rotate(k, positions, theta)
    for b in range(q.shape[0]):
        for t in range(q.shape[2]):
            kc[b, :, int(positions[b, t])] = k_rot[b, :, t]
            vc[b, :, int(positions[b, t])] = v[b, :, t].double()
    q_out = q.new_empty((0,)).double() if theta is None else _rotate(q, positions, theta)
    return q_out, kc, vc


def f_quantize(w):
    s = w.double().abs().amax(-1)
    s = torch.where(s > 0, s / 127, torch.ones_like(s))
    return torch.round(w.double() / s[..., None]).clamp(-127, 127), s


def f_sample(logits, u, temperature, top_k, top_p, min_p):
    """No filters on; greedy rows (T = 0) take the first maximum; others the inverse CDF."""
    tokens = []
    for row, ur, t in zip(logits.double(), u, temperature):
        if t == 0:
            tokens.append(int(torch.argmax(row)))
            continue
        p = torch.softmax(row / float(t), -1)
        tokens.append(int((torch.cumsum(p, -1) > ur * p.sum()).nonzero()[0]))
    return torch.tensor(tokens)


def f_lora_mixed(x, w, a, b, scales, index, bias):
    rows = []
    for i in range(x.shape[0]):
        merged = w.double() if index[i] < 0 else w.double() + scales[index[i]].double() * b[index[i]].double() @ a[index[i]].double()
        rows.append(x[i].double() @ merged.t() + bias.double())
    return torch.stack(rows)


def _capped(z, cap):
    """c·tanh(z / c) (Gemma 2's logit soft-cap), z itself for c = 0."""
    return cap * torch.tanh(z / cap) if cap else z


def f_linear_logprobs(h, w, tokens, temperature, ignore, with_entropy, chunk, cap):
    """log softmax(cap(h·Wᵀ)/T)[token] and the entropy of that distribution, 0 on ignored rows."""
    logp = torch.log_softmax(_capped(h.double() @ w.double().t(), cap) / temperature, dim=-1)
    valid = tokens != ignore
    picked = logp.gather(-1, torch.where(valid, tokens, 0)[:, None]).squeeze(-1) * valid
    entropy = -(logp.exp() * logp).sum(-1) * valid
    return torch.stack((picked, entropy)) if with_entropy else picked[None]


def kd_from_logits(zs, zt, labels, temperature, divergence, beta, alpha, ignore=-100):
    """Distillation loss on full float64 logits, student zs and teacher zt (N, V): mean over kept
    tokens of α·T²·D(p_t, p_s) + (1 − α)·CE, p = softmax(z/T); without labels α·T²·D over every
    token. D: forward_kl KL(p_t‖p_s), reverse_kl KL(p_s‖p_t), jsd β·KL(p_t‖m) + (1−β)·KL(p_s‖m)."""
    zs, zt = zs.double(), zt.double()
    ps, pt = torch.softmax(zs / temperature, -1), torch.softmax(zt / temperature, -1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if divergence == "forward_kl":
        d = kl(pt, ps)
    elif divergence == "reverse_kl":
        d = kl(ps, pt)
    else:
        m = beta * pt + (1 - beta) * ps
        d = beta * kl(pt, m) + (1 - beta) * kl(ps, m)
    if labels is None:
        return (alpha * temperature ** 2 * d).mean()
    keep = labels != ignore
    ce = F.cross_entropy(zs, torch.where(keep, labels, 0), reduction="none")
    return ((alpha * temperature ** 2 * d + (1 - alpha) * ce) * keep).sum() / keep.sum()


def f_linear_distillation_loss(hs, ws, ht, wt, labels, temperature, divergence, beta, alpha, ignore, chunk,
                               need_dh, need_dw, student_cap, teacher_cap):
    """kd_from_logits on each model's (soft-capped) h·Wᵀ (the public function passes α = 1 when
    there are no labels)."""
    return kd_from_logits(_capped(hs.double() @ ws.double().t(), student_cap),
                          _capped(ht.double() @ wt.double().t(), teacher_cap), labels, temperature,
                          divergence, beta, alpha, ignore)


def f_linear_preference_loss(h, w, tokens, mask, ref, loss, beta, gamma, eps, temperature, ignore, chunk, cap, *_):
    """Σ over pairs of the DPO / IPO / SimPO loss on sequence log-probs from full float64 logits
    (soft-capped: cap·tanh(z / cap), when cap > 0)."""
    z = h.double() @ w.double().t()
    logp = torch.log_softmax((cap * torch.tanh(z / cap) if cap else z) / temperature, -1)
    keep = (tokens != ignore) & (mask != 0)
    picked = logp.gather(-1, torch.where(keep, tokens, 0).reshape(-1, 1)).view(tokens.shape)
    seq = (picked * keep).sum(1)
    if loss != "sigmoid":
        seq = seq / keep.sum(1).clamp(min=1)
    c, r = seq.chunk(2)
    if loss == "simpo":
        u = beta * (c - r) - gamma
    else:
        u = beta * ((c - ref[:, 0]) - (r - ref[:, 1]))
    if loss == "ipo":
        return ((u / beta - 1 / (2 * beta)) ** 2).sum()
    return (-(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)).sum()


FORMULAS = {
    "attention": f_attention,
    "attention_varlen": f_attention_varlen,
    "decode_attention": f_decode_attention,
    "decode_attention_paged": f_decode_attention_paged,
    "rms_norm": lambda x, w, eps: x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w,
    "layer_norm": lambda x, w, b, eps: F.layer_norm(x, (x.shape[-1],), w, b, eps),
    "rope": lambda x, positions, theta: _rotate(x, positions, theta),
    "rope_append_kv": f_rope_append_kv,
    "swiglu": lambda g, u: g * torch.sigmoid(g) * u,
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
    "cross_entropy": lambda z, t, ignore: F.cross_entropy(z, t, ignore_index=ignore),
    "lora_linear": lambda x, w, a, b, s, bias: F.linear(x, w + s * b @ a, bias),
    "lora_linear_mixed": f_lora_mixed,
    "quantize_int8": lambda w: f_quantize(w),
    "int8_linear": lambda x, q, s, bias: x @ (q.double() * s.double()[:, None]).t() + bias,
    "quantize_per_token": lambda x, c: f_quantize(x if c is None else x / c),
    "w8a8_linear": lambda x, q, s, bias, c: (
        f_quantize(x)[0] @ q.double().t() * f_quantize(x)[1][:, None] * s.double()[None] + bias.double()),
    "sample": f_sample,
    "fused_linear_cross_entropy": lambda h, w, t, ignore, chunk, need_dh, need_dw: F.cross_entropy(
        h @ w.t(), t, ignore_index=ignore),
    "linear_logprobs": f_linear_logprobs,
    "linear_distillation_loss": f_linear_distillation_loss,
    "linear_preference_loss": f_linear_preference_loss,
}

PARAMS = [(name, i) for name in sorted(DEFINED) for i in range(len(CASES.get(name, lambda: [None])()))]
IDS = [f"{name}-{i}" for name, i in PARAMS]
DIFF = [(name, i) for name, i in PARAMS if DEFINED[name].differentiable]


KEEP_DTYPE = {("sample", 1)}  # the uniform draws stay float64 (the op's contract)


def _args(name, i, grad=False, dtype=None):
    args = list(CASES[name]()[i])
    spec = DEFINED[name]
    for j, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            keep = (name, j) in KEEP_DTYPE or dtype is None
            a = a.clone() if keep else a.to(dtype)
            args[j] = a.requires_grad_(grad and j in spec.differentiable)
    return tuple(args)


def _main(spec, out):
    return out[0] if spec.auxiliary_outputs else out


def _mutated(spec) -> list[int]:
    names = [a.split()[-1] for a in spec.args.split(",")]
    return [names.index(n) for n in spec.mutates]


def test_every_defined_op_has_a_case_and_a_formula():
    missing = sorted(set(DEFINED) - set(CASES)) + sorted(set(DEFINED) - set(FORMULAS))
    assert not missing, f"ops defined with define_op but without a case/formula in this file: {missing}"
    assert len(DEFINED) >= 19


@pytest.mark.parametrize("name,i", PARAMS, ids=IDS)
def test_opcheck(name, i):
    op = getattr(torch.ops.fastlm, name).default
    torch.library.opcheck(op, (*_args(name, i, grad=True), "reference"))


@pytest.mark.parametrize("name,i", PARAMS, ids=IDS)
def test_fake_matches_real_outputs(name, i):
    spec = DEFINED[name]
    args = _args(name, i)
    real = spec.reference(*args)
    fake = spec.fake(*args)
    real, fake = (t if isinstance(t, (tuple, list)) else (t,) for t in (real, fake))
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]


@pytest.mark.parametrize("name,i", PARAMS, ids=IDS)
def test_reference_matches_explicit_formula(name, i):
    spec = DEFINED[name]
    args = _args(name, i)
    expected = FORMULAS[name](*(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args))
    got = spec.reference(*args)
    if spec.mutates:
        got = (got, *(args[j] for j in _mutated(spec)))
    elif not spec.auxiliary_outputs and isinstance(got, tuple) and name != "sample":
        pass  # every output is compared (quantize ops: values and scales)
    else:
        got = _main(spec, got)
    if name == "sample":
        got = got[0]
    if isinstance(expected, tuple):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g.double(), e.double(), atol=1e-6, rtol=1e-6)
    else:
        torch.testing.assert_close(got.double(), expected.double(), atol=1e-6, rtol=1e-6)


def _grad_inputs(spec, args):
    return [args[j] for j in spec.differentiable if isinstance(args[j], torch.Tensor)]


@pytest.mark.parametrize("name,i", DIFF, ids=[f"{n}-{i}" for n, i in DIFF])
def test_gradcheck_custom_op_and_eager_kernel_path(name, i):
    """Both autograd paths of a kernel backend (the custom op under torch.compile, the
    autograd.Function in eager mode) run the backward kernels; here with the reference ones."""
    spec = DEFINED[name]
    args = _args(name, i, grad=True)
    positions = [j for j in spec.differentiable if isinstance(args[j], torch.Tensor)]

    def through(call):
        def f(*inputs):
            full = list(args)
            for j, t in zip(positions, inputs):
                full[j] = t
            return _main(spec, call(*full))
        return f

    inputs = _grad_inputs(spec, args)
    custom = getattr(torch.ops.fastlm, name)
    # fast_mode: the Jacobians checked along random directions (one backward, not one per output)
    assert torch.autograd.gradcheck(through(lambda *a: custom(*a, "reference")), inputs, fast_mode=True)
    assert torch.autograd.gradcheck(through(lambda *a: _KernelFunction.apply(_DEFINED[name], "reference", *a)),
                                    inputs, fast_mode=True)


KERNELS = sorted((op, b) for op, b in registry.registered_kernels() if b != "reference" and op in DEFINED)
KERNEL_IDS = [f"{op}-{b}" for op, b in KERNELS]


def _compare(got, oracle, same_dtype_ref, what):
    """2× rule: |got − oracle| ≤ 2·|reference in the same dtype − oracle| + 1e-5."""
    if not got.is_floating_point():
        assert (got.long() - oracle.long()).abs().max() <= (1 if got.dtype == torch.int8 else 0), what
        return
    bound = 2 * (same_dtype_ref.double() - oracle.double()).abs().max() + 1e-5
    err = (got.double() - oracle.double()).abs().max()
    assert err <= bound, f"{what}: max error {float(err):.3g} > {float(bound):.3g}"


@pytest.mark.parametrize("name,backend_name", KERNELS, ids=KERNEL_IDS)
def test_kernel_matches_reference(name, backend_name):
    """Each registered kernel that can run here against the reference (first case, float32),
    outputs and gradients through the public dispatch (fastlm.ops.registry.run)."""
    ok, why = backend.backend_status(backend_name, "cpu")
    if not ok:
        pytest.skip(f"the {backend_name} backend cannot run here: {why}")
    spec = DEFINED[name]
    own_tests = {"fused_linear_cross_entropy": "tests/ops/test_fused_loss.py",
                 "linear_distillation_loss": "tests/ops/test_logprobs_triton.py",
                 "linear_logprobs": "tests/ops/test_logprobs_triton.py",
                 "linear_preference_loss": "tests/ops/test_preference.py"}
    if name in own_tests:  # chunked ops whose public function always calls the custom op, not run()
        pytest.skip(f"covered by {own_tests[name]} (its own dispatch)")
    oracle_args, args32, ref32_args = _args(name, 0, grad=True), _args(name, 0, grad=True, dtype=torch.float32), \
        _args(name, 0, grad=True, dtype=torch.float32)
    oracle = spec.reference(*oracle_args)
    ref32 = spec.reference(*ref32_args)
    with fastlm.use_backend(backend_name):
        got = registry.run(name, torch.device("cpu"), *args32)
    oracle, ref32 = _main(spec, oracle), _main(spec, ref32)
    outs = [(got, oracle, ref32)] if isinstance(got, torch.Tensor) else list(zip(got, oracle, ref32))
    for n, (g, o, r) in enumerate(outs):
        if name == "sample" and n == 1:  # log-probabilities: compared where the tokens agree
            continue
        _compare(g, o, r, f"{name} output {n}")
    for j in _mutated(spec):
        _compare(args32[j], oracle_args[j], ref32_args[j], f"{name} mutated argument {j}")
    if not spec.differentiable:
        return
    grad = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    g_got = torch.autograd.grad(got, _grad_inputs(spec, args32), grad.float())
    g_oracle = torch.autograd.grad(oracle, _grad_inputs(spec, oracle_args), grad)
    g_ref = torch.autograd.grad(ref32, _grad_inputs(spec, ref32_args), grad.float())
    for n, (g, o, r) in enumerate(zip(g_got, g_oracle, g_ref)):
        _compare(g, o, r, f"{name} gradient {n}")
