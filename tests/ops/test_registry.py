"""The fastlm:: custom ops: opcheck, reference backward formulas, autograd and torch.compile."""

import pytest
import torch

from fastlm.ops import reference
from fastlm.ops.registry import SPECS

SPEC_BY_NAME = {spec.name: spec for spec in SPECS}


def _double(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def op_cases():
    """(name, args without backend) for every op, with odd shapes, GQA, padding and optionals."""
    torch.manual_seed(0)
    q, k, v = _double(2, 4, 5, 6), _double(2, 2, 7, 6), _double(2, 2, 7, 6)
    x, w = _double(3, 5, 12), _double(12)
    q_w, lora_a, lora_b = _double(10, 12), _double(3, 12), _double(10, 3)
    qweight, scales = reference.quantize_int8(torch.randn(10, 12))
    return [
        ("attention", (q, k, v, False, None, None, None, None)),
        ("attention", (q, k, v, True, 0.7, None, None, None)),
        ("attention", (q, k, v, True, None, torch.tensor([7, 0]), None, None)),  # padding + a fully masked sequence
        ("attention", (q, k, v, True, None, torch.tensor([7, 4]), 3, 0.9)),  # sliding window + soft-cap
        ("decode_attention", (q[:, :, :2], k, v, torch.tensor([3, 7]), None, None, None)),
        ("decode_attention", (q[:, :, :2], k, v, torch.tensor([3, 7]), None, 2, 1.5)),
        ("rms_norm", (x, w, 1e-6)),
        ("layer_norm", (x, w, _double(12), 1e-5)),
        ("rope", (_double(2, 3, 5, 8), torch.arange(5), 10000.0)),
        ("rope", (_double(2, 3, 5, 8), torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]]), 500.0)),
        ("swiglu", (_double(4, 9), _double(4, 9))),
        ("gelu", (_double(4, 9),)),
        ("lora_linear", (x, q_w, lora_a, lora_b, 0.5, _double(10))),
        ("lora_linear", (x, q_w, lora_a, lora_b, 2.0, None)),
        ("quantize_int8", (torch.randn(10, 12),)),
        ("int8_linear", (x.float(), qweight, scales, torch.randn(10))),
        ("int8_linear", (x.float(), qweight, scales, None)),
        # fastlm::sample is defined (and opchecked) by fastlm/ops/sampling.py / tests/ops/test_sampling.py
        ("cross_entropy", (_double(6, 11), torch.tensor([1, -100, 3, 10, 0, 5]), -100)),
    ]


CASES = op_cases()
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CASES)]


def _with_grad(name, args):
    spec = SPEC_BY_NAME[name]
    return tuple(
        a.clone().requires_grad_(True) if i in spec.differentiable and isinstance(a, torch.Tensor) else a
        for i, a in enumerate(args)
    )


def test_every_op_is_covered():
    assert {name for name, _ in CASES} == set(SPEC_BY_NAME)


@pytest.mark.parametrize("name,args", CASES, ids=IDS)
def test_opcheck(name, args):
    args = _with_grad(name, args)
    op = getattr(torch.ops.fastlm, name).default
    torch.library.opcheck(op, (*args, "reference"))


@pytest.mark.parametrize("name,args", [c for c in CASES if SPEC_BY_NAME[c[0]].differentiable],
                         ids=[i for i, c in zip(IDS, CASES) if SPEC_BY_NAME[c[0]].differentiable])
def test_custom_op_gradients_match_autograd_through_reference(name, args):
    """The reference backward formulas (used by the custom op) equal autograd through the forward."""
    spec = SPEC_BY_NAME[name]
    args = _with_grad(name, args)
    inputs = [args[i] for i in spec.differentiable if isinstance(args[i], torch.Tensor)]
    out = getattr(torch.ops.fastlm, name)(*args, "reference")
    if spec.auxiliary_outputs:
        out = out[0]
    torch.testing.assert_close(out, getattr(reference, name)(*args))
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad_out)
    expected = torch.autograd.grad(getattr(reference, name)(*args), inputs, grad_out)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-8)


def test_gradcheck_attention_through_custom_op():
    q, k, v = (t.requires_grad_(True) for t in (_double(1, 2, 3, 4), _double(1, 1, 5, 4), _double(1, 1, 5, 4)))
    assert torch.autograd.gradcheck(
        lambda q, k, v: torch.ops.fastlm.attention(q, k, v, True, None, None, None, None, "reference")[0], (q, k, v)
    )


def test_attention_logsumexp_output():
    q, k, v = _double(2, 2, 4, 8), _double(2, 1, 6, 8), _double(2, 1, 6, 8)
    key_lens = torch.tensor([6, 0])
    out, lse = torch.ops.fastlm.attention(q, k, v, True, 0.5, key_lens, None, None, "reference")
    scores = (q @ k.transpose(-1, -2)) * 0.5  # (B, H, 4, 6); causal offset 2: query i sees keys <= i + 2
    mask = torch.arange(6)[None, :] <= torch.arange(4)[:, None] + 2
    expected = torch.logsumexp(scores[0].masked_fill(~mask, float("-inf")), dim=-1)
    torch.testing.assert_close(lse[0], expected)
    assert torch.isneginf(lse[1]).all() and (out[1] == 0).all()


def test_only_needed_gradients_are_computed():
    """A frozen weight (LoRA's W) gets no gradient; the others do."""
    x, w, a, b = _double(4, 6).requires_grad_(), _double(5, 6), _double(2, 6).requires_grad_(), _double(5, 2)
    b.requires_grad_()
    out = torch.ops.fastlm.lora_linear(x, w, a, b, 1.0, None, "reference")
    out.sum().backward()
    assert w.grad is None and x.grad is not None and a.grad is not None and b.grad is not None


def test_torch_compile_traces_custom_ops():
    """aot_eager runs the fake implementations and the autograd registration under torch.compile."""

    def block(x, w, q, k, v):
        h = torch.ops.fastlm.rms_norm(x, w, 1e-6, "reference")
        o = torch.ops.fastlm.attention(q, k, v, True, None, None, None, None, "reference")[0]
        return h.sum() + o.sum()

    args = [torch.randn(2, 8), torch.randn(8), torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)]
    args = [a.requires_grad_() for a in args]
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out = compiled(*args)
    out.backward()
    grads = [a.grad.clone() for a in args]
    for a in args:
        a.grad = None
    block(*args).backward()
    torch.testing.assert_close(out, block(*args))
    for g, a in zip(grads, args):
        torch.testing.assert_close(g, a.grad)
