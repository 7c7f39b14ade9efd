"""RMSNorm's chunked kernels (rows longer than one register tile: forward N > 16384, backward
N > 8192 on the GPU, where whole-row tiles spill registers) against the float64 reference.

Under the interpreter the thresholds and chunk sizes are lowered (module constants of
fastlm.kernels.norms) so small rows take the chunked path: N = 100 in chunks of 32 (a partial
last chunk), row blocks of 2 with an odd row count, several rows per program, and each
gradient alone. Tolerances: the 2× rule of tests/ops/test_triton_fused.py.
"""

import pytest
import torch

from fastlm import ops
from fastlm.ops import reference
from fastlm.ops.backend import kernel_module
from tests.ops.test_triton_fused import DTYPES, check_against_reference, randn, run_op

pytest.importorskip("triton")


@pytest.fixture
def chunked(monkeypatch):
    """Force the chunked kernels for rows over 32 columns, in 32-column pieces."""
    norms = kernel_module("norms")
    monkeypatch.setattr(norms, "FWD_MAX_TILE", 32)
    monkeypatch.setattr(norms, "BWD_MAX_TILE", 32)
    monkeypatch.setattr(norms, "FWD_CHUNK", 32)
    monkeypatch.setattr(norms, "BWD_CHUNK", 32)
    calls = []
    for name in ("_rms_norm_fwd_chunked", "_rms_norm_bwd_chunked", "_rms_norm_fwd", "_rms_norm_bwd"):
        kernel = getattr(norms, name)

        class Spy:
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                calls.append(self.name)
                return self.kernel[grid]

        monkeypatch.setattr(norms, name, Spy(kernel, name))
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 7])
def test_rms_norm_chunked(chunked, dtype, rows):
    x, w = randn(rows, 100, dtype=dtype), randn(100, dtype=dtype)
    check_against_reference("rms_norm chunked", lambda x, w: ops.rms_norm(x, w, 1e-6),
                            lambda x, w: reference.rms_norm(x, w, 1e-6), [x, w], torch.randn_like(x))
    assert set(chunked) == {"_rms_norm_fwd_chunked", "_rms_norm_bwd_chunked"}


@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_rms_norm_chunked_single_gradient(chunked, need):
    x = randn(9, 70, grad=need[0])
    w = randn(70, grad=need[1])
    dy = torch.randn(9, 70)
    out, grads = run_op(lambda x, w: ops.rms_norm(x, w, 1e-5), [x, w], dy, "triton")
    x64 = x.detach().double().requires_grad_(need[0])
    w64 = w.detach().double().requires_grad_(need[1])
    want = torch.autograd.grad(reference.rms_norm(x64, w64, 1e-5), [t for t in (x64, w64) if t.requires_grad],
                               dy.double())
    assert len(grads) == 1
    torch.testing.assert_close(grads[0].double(), want[0], atol=1e-5, rtol=1e-5)
