"""fastlm.ops.rope_append_kv: RoPE on the new q/k fused with the KV-cache append.

The oracle is the unfused computation (ops.rope on q and k in float64, then a scatter into the
caches); the Triton kernel runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py) and on CUDA
when present.
"""

import pytest
import torch

import fastlm
from fastlm import ops
from fastlm.ops import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [  # (B, H, Hkv, T, Lmax, D, theta)
    (1, 4, 2, 1, 9, 40, 10000.0),
    (3, 4, 4, 1, 37, 64, 500000.0),
    (2, 6, 2, 5, 16, 96, 10000.0),  # a few tokens (prefill chunk / speculative verification)
    (2, 2, 1, 3, 8, 24, None),  # GPT-2: no rotation, only the append
]


def _inputs(b, h, hkv, t, lmax, d, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(b, hkv, t, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(b, hkv, t, d, generator=g).to(device=device, dtype=dtype)
    start = torch.randint(0, lmax - t + 1, (b, 1), generator=g)
    positions = (start + torch.arange(t)).to(device)  # (B, T): ragged starts
    caches = [torch.randn(b, hkv, lmax, d, generator=g).to(device=device, dtype=dtype) for _ in range(2)]
    return q, k, v, positions, caches


def _expected(q, k, v, positions, caches, theta):
    """float64 unfused oracle: rope(q), and the caches with rope(k)/v scattered in."""
    k_cache, v_cache = (c.double().clone() for c in caches)
    if theta is not None:
        q, k = reference.rope(q.double(), positions, theta), reference.rope(k.double(), positions, theta)
    for b in range(q.shape[0]):
        k_cache[b, :, positions[b]] = k[b].double()
        v_cache[b, :, positions[b]] = v[b].double()
    return q.double(), k_cache, v_cache


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_append_matches_unfused(case, backend, dtype):
    if backend == "triton":
        pytest.importorskip("triton")
    *shape, theta = case
    q, k, v, positions, caches = _inputs(*shape, dtype)
    want_q, want_k, want_v = _expected(q, k, v, positions, caches, theta)
    untouched = torch.ones_like(caches[0], dtype=torch.bool)
    for b in range(q.shape[0]):
        untouched[b, :, positions[b]] = False
    before = [c.clone() for c in caches]
    with fastlm.use_backend(backend):
        out = ops.rope_append_kv(q, k, v, positions, *caches, theta=theta)
    # Error budget: the same dtype's own rounding of the unfused PyTorch computation (2× rule).
    torch_q = q if theta is None else reference.rope(q, positions, theta)
    tol = 2 * (torch_q.double() - want_q).abs().max().item() + (1e-5 if dtype == torch.float32 else 1e-2)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.double() - want_q).abs().max() <= tol
    assert (caches[0].double() - want_k).abs().max() <= tol
    assert torch.equal(caches[1].double(), want_v)  # values are copied exactly
    assert torch.equal(caches[0][untouched], before[0][untouched])  # nothing else written
    assert torch.equal(caches[1][untouched], before[1][untouched])
    if theta is None:
        assert out is q


def test_triton_cache_dtype_differs_from_k():
    """bf16 k/v into a float32 cache: rounded to bf16 first, exactly as the reference."""
    pytest.importorskip("triton")
    q, k, v, positions, _ = _inputs(2, 4, 2, 2, 6, 32, torch.bfloat16)
    results = []
    for backend in ("reference", "triton"):
        caches = [torch.zeros(2, 2, 6, 32) for _ in range(2)]
        with fastlm.use_backend(backend):
            out = ops.rope_append_kv(q, k, v, positions, *caches, theta=10000.0)
        results.append((out, *caches))
    for ref, ker in zip(*results):
        torch.testing.assert_close(ker, ref, atol=1e-2, rtol=0)
    assert torch.equal(results[0][2], results[1][2])


def test_opcheck():
    q, k, v, positions, caches = _inputs(2, 4, 2, 3, 8, 16, torch.float32)
    for theta in (10000.0, None):
        torch.library.opcheck(torch.ops.fastlm.rope_append_kv.default,
                              (q, k, v, positions, *(c.clone() for c in caches), theta, "reference"))


@pytest.mark.parametrize("mutate,match", [
    (lambda a: {**a, "k": a["k"][:, :, :1]}, "k and v must be"),
    (lambda a: {**a, "q": a["q"][:, :3]}, "multiple of Hkv"),
    (lambda a: {**a, "k_cache": a["k_cache"][:1]}, "caches must be"),
    (lambda a: {**a, "k_cache": a["k_cache"].transpose(2, 3).contiguous().transpose(2, 3)}, "unit stride"),
    (lambda a: {**a, "positions": a["positions"].float()}, "integer tensor"),
    (lambda a: {**a, "positions": a["positions"][:, :1]}, r"\(2, 3\)"),
    (lambda a: {**a, "v": a["v"].double()}, "dtype"),
    (lambda a: {**a, "theta": -1.0}, "theta > 0"),
])
def test_bad_inputs(mutate, match):
    q, k, v, positions, (kc, vc) = _inputs(2, 4, 2, 3, 8, 16, torch.float32)
    args = mutate({"q": q, "k": k, "v": v, "positions": positions, "k_cache": kc, "v_cache": vc, "theta": 1e4})
    with pytest.raises((ValueError, TypeError), match=match):
        ops.rope_append_kv(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("positions"),
                           args.pop("k_cache"), args.pop("v_cache"), theta=args.pop("theta"))


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("theta", [10000.0, None])
def test_rope_append_into_stacked_layer(compiled, theta):
    """rope_append_kv_layer = rope_append_kv on the layer's view; compiled (the index_put_ form
    the compiler keeps in place) it writes the same values into the same buffers, in place,
    and leaves the other layers alone."""
    from fastlm.ops.rotary import rope_append_kv_layer

    q, k, v, positions, _ = _inputs(3, 4, 2, 2, 7, 16, torch.float32)
    g = torch.Generator().manual_seed(1)
    stacked = [torch.randn(3, 3, 2, 7, 16, generator=g) for _ in range(2)]  # (L, B, Hkv, Lmax, D)
    want = [c.clone() for c in stacked]
    want_q = ops.rope_append_kv(q, k, v, positions, want[0][1], want[1][1], theta=theta)
    fn = torch.compile(rope_append_kv_layer, fullgraph=True, dynamic=False) if compiled else rope_append_kv_layer
    pointers = [c.data_ptr() for c in stacked]
    out = fn(q, k, v, positions, *stacked, 1, theta=theta)
    torch.testing.assert_close(out, want_q, atol=1e-5, rtol=1e-5)  # traced vs eager rotation
    torch.testing.assert_close(stacked[0], want[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(stacked[1], want[1])
    assert [c.data_ptr() for c in stacked] == pointers


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rope_append_on_gpu(dtype):
    q, k, v, positions, caches = _inputs(8, 32, 8, 1, 4096, 128, dtype, device="cuda")
    want_q, want_k, want_v = _expected(q, k, v, positions, caches, 500000.0)
    out = ops.rope_append_kv(q, k, v, positions, *caches, theta=500000.0)  # auto: the triton kernel
    tol = 2 * (reference.rope(q, positions, 500000.0).double() - want_q).abs().max().item() + 1e-2
    assert (out.double() - want_q).abs().max() <= tol
    assert (caches[0].double() - want_k).abs().max() <= tol
    assert torch.equal(caches[1].double(), want_v)
