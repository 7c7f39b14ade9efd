"""Triton split-K decode attention (contiguous and paged) against the reference."""

import pytest
import torch

import fastlm
from fastlm import ops
from fastlm.ops.paged import gather_pages

CASES = [  # (B, H, Hkv, Tq, Lmax, D)
    (1, 4, 1, 1, 129, 40),
    (3, 4, 2, 1, 37, 64),
    (2, 2, 2, 3, 70, 96),  # a few query tokens (speculative verification)
]


def _inputs(b, h, hkv, tq, lmax, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, lmax, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, lmax, d, generator=g).to(dtype)
    lens = torch.randint(tq, lmax + 1, (b,), generator=g)
    lens[0] = lmax
    return q, k, v, lens


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_reference(case, dtype):
    q, k, v, lens = _inputs(*case, dtype)
    expected = ops.reference.decode_attention(q.double(), k.double(), v.double(), lens)
    with fastlm.use_backend("triton"):
        out = ops.decode_attention(q, k, v, lens)
    torch_err = (ops.reference.decode_attention(q, k, v, lens).double() - expected).abs().max()
    atol = 1e-5 if dtype == torch.float32 else 2 * torch_err.item() + 1e-3
    assert (out.double() - expected).abs().max() <= atol


@pytest.mark.parametrize("case", CASES[:2])
def test_paged_decode_matches_reference(case):
    b, h, hkv, tq, lmax, d = case
    q, _, _, lens = _inputs(*case, torch.float32)
    page, blocks = 8, -(-lmax // 8)
    g = torch.Generator().manual_seed(1)
    k_pages, v_pages = torch.randn(b * blocks + 1, hkv, page, d, generator=g), torch.randn(b * blocks + 1, hkv, page, d, generator=g)
    table = (torch.randperm(b * blocks, generator=g) + 1).view(b, blocks).to(torch.int32)
    expected = ops.decode_attention(q, gather_pages(k_pages, table), gather_pages(v_pages, table), lens)
    with fastlm.use_backend("triton"):
        out = ops.decode_attention_paged(q, k_pages, v_pages, table, lens)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("b,lmax", [(1, 32768), (8, 4096), (64, 1024)])
def test_decode_on_gpu(b, lmax):
    q, k, v, lens = (t.cuda() for t in _inputs(b, 32, 8, 1, lmax, 128, torch.bfloat16))
    expected = ops.reference.decode_attention(q.double(), k.double(), v.double(), lens)
    torch_err = (ops.reference.decode_attention(q, k, v, lens).double() - expected).abs().max()
    out = ops.decode_attention(q, k, v, lens)  # auto: the triton kernel on CUDA
    assert (out.double() - expected).abs().max() <= 2 * torch_err + 1e-3
