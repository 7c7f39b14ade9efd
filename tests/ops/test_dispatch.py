"""Backend selection: automatic choice, forcing, errors that say why, routing to kernels."""

import pytest
import torch

import fastlm
from fastlm import ops
from fastlm.ops import backend


@pytest.fixture
def fake_triton_gelu(monkeypatch):
    """A stand-in 'triton' kernel for gelu that records its calls, removed afterwards."""
    calls = []

    def kernel(x):
        calls.append(x.shape)
        return torch.full_like(x, 7.0)

    monkeypatch.setitem(backend._KERNELS, ("gelu", "triton"), kernel)
    return calls


def test_cpu_defaults_to_reference():
    assert backend.select("attention", torch.device("cpu")) == "reference"
    assert fastlm.available_backends("cpu")[-1] == "reference"


def test_auto_never_picks_the_interpreter(monkeypatch, fake_triton_gelu):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(4)
    torch.testing.assert_close(ops.gelu(x), ops.reference.gelu(x))
    assert fake_triton_gelu == []


def test_forced_backend_routes_through_the_custom_op(monkeypatch, fake_triton_gelu):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(3, 5)
    with fastlm.use_backend("triton"):
        out = ops.gelu(x)
    assert fake_triton_gelu == [(3, 5)] and (out == 7.0).all()


def test_env_variable_forces_a_backend(monkeypatch, fake_triton_gelu):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTLM_BACKEND", "triton")
    assert (ops.gelu(torch.randn(2)) == 7.0).all()
    with fastlm.use_backend("reference"):  # the context manager wins over the environment
        assert (ops.gelu(torch.zeros(2)) == 0.0).all()


def test_use_backend_restores_on_exit():
    with fastlm.use_backend("reference"):
        assert backend.forced_backend() == "reference"
        with fastlm.use_backend(None):
            assert backend.forced_backend() is None
        assert backend.forced_backend() == "reference"
    assert backend.forced_backend() is None


def test_unknown_backend_is_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown fastlm backend 'fast'.*reference, triton, cuda"):
        fastlm.use_backend("fast")
    monkeypatch.setenv("FASTLM_BACKEND", "tpu")
    with pytest.raises(ValueError, match="unknown fastlm backend 'tpu'"):
        ops.gelu(torch.randn(2))


def test_forced_triton_on_cpu_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with fastlm.use_backend("triton"), pytest.raises(ops.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        ops.gelu(torch.randn(2))


def test_forced_cuda_on_cpu_says_why():
    with fastlm.use_backend("cuda"), pytest.raises(ops.BackendUnavailableError, match="needs CUDA tensors"):
        ops.rms_norm(torch.randn(2, 4), torch.ones(4))


def test_missing_kernel_names_op_and_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with fastlm.use_backend("triton"), pytest.raises(NotImplementedError, match="'quantize_int8' has no 'triton' kernel"):
        ops.quantize_int8(torch.randn(3, 4))


def test_backend_status_reasons(monkeypatch):
    assert backend.backend_status("reference", "cpu")[0]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok, why = backend.backend_status("triton", "cpu")
    assert ok == backend._triton_installed()
    ok, why = backend.backend_status("cuda", "cpu")
    assert not ok and "CUDA tensors" in why


def test_register_kernel_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown fastlm backend"):
        ops.register_kernel("gelu", "metal")


def test_kernel_backend_trains_through_the_custom_op(monkeypatch):
    """A kernel backend plugs in a forward (out, lse) and a backward that receives them."""
    from fastlm.ops import reference, reference_backward

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    seen = {}

    def forward(*args):
        return reference.attention_forward(*args)

    def backward(grad, q, k, v, causal, scale, key_lens, window, softcap, out, lse, needs):
        seen["lse"], seen["needs"] = lse, list(needs)
        grads = reference_backward.attention_backward(grad, q, k, v, causal, scale, key_lens, window, softcap, out, lse)
        return [g if need else g.new_empty(0) for g, need in zip(grads, needs)]

    monkeypatch.setitem(backend._KERNELS, ("attention", "triton"), forward)
    monkeypatch.setitem(backend._KERNELS, ("attention_backward", "triton"), backward)
    q = torch.randn(1, 4, 5, 8, requires_grad=True)
    k = torch.randn(1, 2, 7, 8, requires_grad=True)
    v = torch.randn(1, 2, 7, 8)  # no gradient wanted for v
    with fastlm.use_backend("triton"):
        out = ops.attention(q, k, v, causal=True)
    out.square().sum().backward()
    assert seen["needs"] == [True, True, False] and seen["lse"].shape == (1, 4, 5)
    q2, k2 = q.detach().requires_grad_(), k.detach().requires_grad_()
    ops.reference.attention(q2, k2, v, causal=True).square().sum().backward()
    torch.testing.assert_close(q.grad, q2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k.grad, k2.grad, atol=1e-5, rtol=1e-5)
    assert v.grad is None
