"""The reference backend's eager paths (``OpSpec.reference_eager``: what ``run`` calls on CPU)
against the op's reference, the oracle: rope (roll + cached signed tables), rms_norm (a lean
backward), cross_entropy (PyTorch's fused log_softmax + nll_loss), layer_norm and gelu
(PyTorch's fused F.layer_norm, F.gelu(approximate="tanh")).

Outputs and gradients: in float64 on every case of tests/ops/test_every_op.py plus gradcheck of
the eager path, and in float32 at training shapes by the 2× rule against the float64 oracle
(|eager − oracle| ≤ 2·|reference in float32 − oracle| + 1e-6). rope's eager path gives the
reference's values bit for bit, forward and backward.
"""

from __future__ import annotations

import gc

import pytest
import torch

import fastlm
from fastlm.ops import losses, registry, rotary
from fastlm.ops.norms import rms_norm_eager, rms_norm_reference
from tests.ops.test_every_op import CASES, _args, _grad_inputs, _main

EAGER = sorted(name for name, spec in registry.defined_ops().items() if spec.reference_eager is not None)
EAGER_CASES = [(name, i) for name in EAGER for i in range(len(CASES[name]()))]


def test_the_training_ops_have_an_eager_path():
    assert {"rope", "rms_norm", "cross_entropy", "layer_norm", "gelu", "attention"} <= set(EAGER)


def _outputs_and_grads(fn, args, spec, grad_seed=7):
    out = fn(*args)
    out = out if fn is spec.reference_eager else _main(spec, out)  # the eager path returns the main output
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(grad_seed))
    grad = grad.to(out.dtype)  # the same direction in every dtype
    return out, torch.autograd.grad(out, _grad_inputs(spec, args), grad)


@pytest.mark.parametrize("name,i", EAGER_CASES, ids=[f"{n}-{i}" for n, i in EAGER_CASES])
def test_eager_path_matches_reference_float64(name, i):
    spec = registry.spec_of(name)
    ref_out, ref_grads = _outputs_and_grads(spec.reference, _args(name, i, grad=True), spec)
    got_out, got_grads = _outputs_and_grads(spec.reference_eager, _args(name, i, grad=True), spec)
    torch.testing.assert_close(got_out, ref_out, atol=1e-12, rtol=1e-12)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name,i", EAGER_CASES, ids=[f"{n}-{i}" for n, i in EAGER_CASES])
def test_eager_path_gradcheck(name, i):
    spec = registry.spec_of(name)
    args = _args(name, i, grad=True)
    positions = [j for j in spec.differentiable if isinstance(args[j], torch.Tensor)]

    def f(*inputs):
        full = list(args)
        for j, t in zip(positions, inputs):
            full[j] = t
        return spec.reference_eager(*full)

    assert torch.autograd.gradcheck(f, _grad_inputs(spec, args), fast_mode=True)


def _within_2x(got, oracle, ref32, what):
    bound = 2 * (ref32.double() - oracle).abs().max() + 1e-6
    err = (got.double() - oracle).abs().max()
    assert err <= bound, f"{what}: max error {float(err):.3g} > {float(bound):.3g}"


def _training_args(name):
    g = torch.Generator().manual_seed(3)
    if name == "rope":  # q as the model makes it: a transposed view of the fused projection
        qkv = torch.randn(2, 9, 3 * 4 * 16, dtype=torch.float64, generator=g)
        return (qkv[..., :64].view(2, 9, 4, 16).transpose(1, 2), torch.arange(9), 10000.0)
    if name == "rms_norm":
        return (torch.randn(2, 9, 48, dtype=torch.float64, generator=g) * 3,
                1 + 0.1 * torch.randn(48, dtype=torch.float64, generator=g), 1e-5)
    if name == "layer_norm":
        return (torch.randn(2, 9, 48, dtype=torch.float64, generator=g) * 3 + 1,
                1 + 0.1 * torch.randn(48, dtype=torch.float64, generator=g),
                0.1 * torch.randn(48, dtype=torch.float64, generator=g), 1e-5)
    if name == "gelu":
        return (torch.randn(2, 9, 48, dtype=torch.float64, generator=g) * 3,)
    targets = torch.randint(0, 300, (37,), generator=g)
    targets[::5] = -100
    return (torch.randn(37, 300, dtype=torch.float64, generator=g) * 4, targets, -100)


@pytest.mark.parametrize("name", ["rope", "rms_norm", "cross_entropy", "layer_norm", "gelu"])
def test_eager_path_float32_by_the_2x_rule(name):
    spec = registry.spec_of(name)

    def prepared(dtype):
        return tuple(a.detach().to(dtype).requires_grad_(j in spec.differentiable)
                     if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for j, a in enumerate(_training_args(name)))

    oracle, oracle_grads = _outputs_and_grads(spec.reference, prepared(torch.float64), spec)
    ref32, ref32_grads = _outputs_and_grads(spec.reference, prepared(torch.float32), spec)
    got, got_grads = _outputs_and_grads(spec.reference_eager, prepared(torch.float32), spec)
    assert got.dtype == ref32.dtype and got.shape == ref32.shape
    _within_2x(got, oracle, ref32, f"{name} output")
    for n, (g, o, r) in enumerate(zip(got_grads, oracle_grads, ref32_grads)):
        _within_2x(g, o.double(), r, f"{name} gradient {n}")


# ---- rope: bit for bit, and the tables cached per positions tensor ---------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batched_positions", [False, True])
def test_rope_eager_is_the_reference_bit_for_bit(dtype, batched_positions):
    qkv = torch.randn(3, 7, 3 * 2 * 8, dtype=dtype)
    x = qkv[..., :16].view(3, 7, 2, 8).transpose(1, 2)  # (B, H, T, D), non-contiguous
    positions = torch.randint(0, 50, (3, 7)) if batched_positions else torch.arange(5, 12)
    a, b = x.detach().requires_grad_(), x.detach().requires_grad_()
    ya, yb = rotary.rope_reference(a, positions, 500.0), rotary.rope_eager(b, positions, 500.0)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    assert yb.dtype == ya.dtype and torch.equal(ya, yb)
    assert torch.equal(a.grad, b.grad)


def test_rope_tables_follow_in_place_changes_and_leave_with_their_positions():
    x = torch.randn(1, 2, 4, 8)
    positions = torch.arange(4)
    first = rotary.rope_eager(x, positions, 10000.0)
    assert torch.equal(rotary.rope_eager(x, positions, 10000.0), first)  # the cached tables
    positions.add_(3)  # in place: a new version, new tables
    assert torch.equal(rotary.rope_eager(x, positions, 10000.0), rotary.rope_reference(x, positions, 10000.0))
    assert not torch.equal(rotary.rope_eager(x, positions, 10000.0), first)
    assert torch.equal(rotary.rope_eager(x, positions, 500.0), rotary.rope_reference(x, positions, 500.0))
    held = [key for key in rotary._TABLES if key[0] == id(positions)]
    assert held
    del positions
    gc.collect()
    assert not any(key in rotary._TABLES for key in held)


def test_rope_tables_made_in_inference_mode_do_not_reach_training():
    positions = torch.arange(4)
    with torch.inference_mode():
        rotary.rope_eager(torch.randn(1, 2, 4, 8), positions, 10000.0)
    x = torch.randn(1, 2, 4, 8, requires_grad=True)
    rotary.rope_eager(x, positions, 10000.0).sum().backward()  # would raise on saved inference tensors
    assert x.grad is not None
    with torch.inference_mode():  # inference-tensor positions: the reference itself
        inf_positions = torch.arange(4)
        y = rotary.rope_eager(x.detach(), inf_positions, 10000.0)
    assert torch.equal(y, rotary.rope_reference(x.detach(), torch.arange(4), 10000.0))


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
def test_model_training_step_uses_the_eager_paths_and_matches_the_references(monkeypatch, preset):
    """A model's loss and gradients through the eager paths equal those through the references
    (rope bit for bit; the others to float32 rounding)."""
    torch.manual_seed(0)
    kv = {"num_kv_heads": 2, "intermediate_size": 48} if preset == "tiny" else {}
    model = fastlm.Model(fastlm.preset(preset, vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, **kv))
    ids = torch.randint(0, 64, (2, 9))

    def loss_and_grads():
        loss = fastlm.ops.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return loss, grads

    eager_loss, eager_grads = loss_and_grads()
    for name in ("rope", "rms_norm", "cross_entropy", "layer_norm", "gelu"):
        monkeypatch.setattr(registry._DEFINED[name], "reference", registry.spec_of(name).reference)
    ref_loss, ref_grads = loss_and_grads()
    torch.testing.assert_close(eager_loss, ref_loss, atol=1e-6, rtol=1e-6)
    for g, r in zip(eager_grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-7, rtol=1e-4)


# ---- rms_norm and cross_entropy specifics ------------------------------------------------------------


def test_rms_norm_eager_forward_is_the_reference_bit_for_bit():
    x, w = torch.randn(3, 5, 40, requires_grad=True), torch.randn(40, requires_grad=True)
    assert torch.equal(rms_norm_eager(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
    with torch.no_grad():
        assert torch.equal(rms_norm_eager(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))


def test_rms_norm_eager_gradient_of_one_argument_only():
    x, w = torch.randn(3, 5, 40), torch.randn(40)
    for needs_x in (True, False):
        a, wa = x.clone().requires_grad_(needs_x), w.clone().requires_grad_(not needs_x)
        b, wb = x.clone().requires_grad_(needs_x), w.clone().requires_grad_(not needs_x)
        grad = torch.randn(3, 5, 40)
        (ga,) = torch.autograd.grad(rms_norm_eager(a, wa, 1e-6), [a if needs_x else wa], grad)
        (gb,) = torch.autograd.grad(rms_norm_reference(b, wb, 1e-6), [b if needs_x else wb], grad)
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-5)


def test_rms_norm_eager_mixed_dtypes_take_the_reference():
    x, w = torch.randn(2, 3, 16, dtype=torch.bfloat16, requires_grad=True), torch.randn(16, requires_grad=True)
    y = rms_norm_eager(x, w, 1e-6)
    assert y.dtype == torch.float32 and torch.equal(y, rms_norm_reference(x, w, 1e-6))


def test_cross_entropy_eager_chunks_and_ignored_rows(monkeypatch):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(11, 50, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 50, (11,), generator=g)
    targets[[1, 4]] = -100
    whole = losses.cross_entropy_eager(logits, targets, -100)
    monkeypatch.setattr(losses, "CROSS_ENTROPY_CHUNK", 150)  # 3 rows per chunk
    torch.testing.assert_close(losses.cross_entropy_eager(logits, targets, -100), whole, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(whole, losses.cross_entropy_reference(logits, targets, -100), atol=1e-12, rtol=1e-12)
    assert torch.isnan(losses.cross_entropy_eager(logits, torch.full((11,), -100), -100))
    bf16 = losses.cross_entropy_eager(logits.to(torch.bfloat16), targets, -100)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, losses.cross_entropy_reference(logits.to(torch.bfloat16), targets, -100))


def test_layer_norm_and_gelu_eager_low_precision_take_the_reference():
    from fastlm.ops.activations import gelu_eager, gelu_reference
    from fastlm.ops.norms import layer_norm_eager, layer_norm_reference

    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    assert torch.equal(gelu_eager(x), gelu_reference(x))
    w, b = torch.randn(16), torch.randn(16)
    assert torch.equal(layer_norm_eager(x, w, b, 1e-5), layer_norm_reference(x, w, b, 1e-5))
    assert torch.equal(layer_norm_eager(x, w.bfloat16(), b.bfloat16(), 1e-5),
                       layer_norm_reference(x, w.bfloat16(), b.bfloat16(), 1e-5))
