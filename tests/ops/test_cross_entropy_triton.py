"""ops.cross_entropy on the Triton kernel (interpreter on CPU) vs an fp64 oracle, by the 2× rule
against F.cross_entropy in the same dtype: loss and dlogits, ignore_index, odd shapes."""

import pytest
import torch
import torch.nn.functional as F

from fastlm import ops
from fastlm.ops.backend import has_kernel

pytest.importorskip("triton")


def _case(n, v, dtype, ignore_every=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        targets[1::ignore_every] = -100  # (row 0 stays valid: a 1-row case is not all ignored)
    return logits, targets


def _loss_and_grad(fn, logits, targets):
    x = logits.clone().requires_grad_(True)
    loss = fn(x, targets)
    loss.backward()
    return loss.detach(), x.grad


def test_registered():
    assert has_kernel("cross_entropy", "triton") and has_kernel("cross_entropy_backward", "triton")


@pytest.mark.parametrize("n,v", [(1, 7), (5, 123), (17, 300), (8, 1030)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ignore_every", [0, 3])
def test_matches_the_oracle_by_the_2x_rule(n, v, dtype, ignore_every):
    logits, targets = _case(n, v, dtype, ignore_every)
    oracle_loss, oracle_grad = _loss_and_grad(lambda x, t: F.cross_entropy(x, t), logits.double(), targets)
    torch_loss, torch_grad = _loss_and_grad(lambda x, t: F.cross_entropy(x, t), logits, targets)
    with ops.use_backend("triton"):
        loss, grad = _loss_and_grad(ops.cross_entropy, logits, targets)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    # PyTorch's F.cross_entropy returns the loss in the logits dtype; ours is float32.
    torch_loss_err = (torch_loss.double() - oracle_loss).abs().item()
    assert (loss.double() - oracle_loss).abs().item() <= 2 * torch_loss_err + 1e-6
    torch_grad_err = (torch_grad.double() - oracle_grad).abs().max().item()
    assert (grad.double() - oracle_grad).abs().max().item() <= 2 * torch_grad_err + 1e-7


def test_float64_and_equals_the_reference():
    logits, targets = _case(9, 77, torch.float64, ignore_every=4)
    ref_loss, ref_grad = _loss_and_grad(ops.cross_entropy, logits, targets)
    with ops.use_backend("triton"):
        loss, grad = _loss_and_grad(ops.cross_entropy, logits, targets)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)


def test_ignored_rows_get_zero_gradient_and_all_ignored_is_nan():
    logits, targets = _case(6, 50, torch.float32, ignore_every=2)
    with ops.use_backend("triton"):
        _, grad = _loss_and_grad(ops.cross_entropy, logits, targets)
        assert (grad[1::2] == 0).all() and (grad[::2] != 0).any()
        loss = ops.cross_entropy(logits, torch.full((6,), -100))
    assert torch.isnan(loss)  # 0 / 0, as F.cross_entropy


def test_non_contiguous_logits_and_the_input_is_left_alone():
    logits, targets = _case(8, 64, torch.float32)
    wide = torch.cat((logits, logits), dim=1)[:, ::2]  # stride 2 along the vocabulary
    original = wide.clone()
    with ops.use_backend("triton"):
        loss, grad = _loss_and_grad(ops.cross_entropy, wide, targets)
    assert torch.equal(wide, original)
    ref_loss, ref_grad = _loss_and_grad(F.cross_entropy, wide, targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_reference_never_copies_all_logits_to_float32(monkeypatch):
    """The reference's float32 work is chunked: no float32 tensor of N·V elements appears."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastlm.ops import losses, reference

    monkeypatch.setattr(losses, "CROSS_ENTROPY_CHUNK", 64 * 10)  # 10 rows of V = 64 per chunk
    logits, targets = _case(40, 64, torch.bfloat16, ignore_every=3)
    sizes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    sizes.append(t.numel())
            return out

    with Record():
        loss = reference.cross_entropy(logits, targets)
    assert max(sizes) <= 64 * 10
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), targets), rtol=1e-6, atol=1e-6)
