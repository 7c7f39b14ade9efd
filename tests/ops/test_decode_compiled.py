"""decode_attention's reference as torch.compile traces it on CPU (the compiled decode step's
attention): products and sums over broadcast views that inductor fuses into loops
(``fastlm.ops.decode._decode_attention_loops``) instead of its SDPA call. Against the float64
oracle by the 2× rule: |compiled − oracle| ≤ 2·|eager float32 reference − oracle| + 1e-6, over
GQA, Tq 1 and 3 (a sequence shorter than Tq gives zeros), a sliding window and a soft-cap."""

from __future__ import annotations

import pytest
import torch

from fastlm.ops import decode

CASES = {  # (B, H, Hkv, Tq, Lmax, D, lens, window, softcap)
    "gqa-t1": (3, 8, 2, 1, 37, 40, [1, 20, 37], None, None),
    "mha-t3-short": (2, 4, 4, 3, 29, 96, [2, 29], None, None),
    "window": (2, 6, 3, 1, 33, 32, [33, 9], 5, None),
    "softcap": (2, 4, 2, 2, 17, 40, [17, 5], None, 30.0),
}


@pytest.mark.parametrize("name", CASES)
def test_compiled_reference_is_the_loop_form_within_2x_of_eager_float32(name, monkeypatch):
    b, h, hkv, tq, lmax, d, lens, window, softcap = CASES[name]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g) for shape in ((b, h, tq, d), (b, hkv, lmax, d), (b, hkv, lmax, d)))
    lens = torch.tensor(lens)
    traced = []
    loops = decode._decode_attention_loops
    monkeypatch.setattr(decode, "_decode_attention_loops", lambda *a: traced.append(1) or loops(*a))

    def fn(q, k, v, lens):
        return decode.decode_attention_reference(q, k, v, lens, window=window, softcap=softcap)

    compiled = torch.compile(fn, fullgraph=True, dynamic=False)(q, k, v, lens)
    assert traced, "the compiled reference did not take the loop form"
    n_traced = len(traced)
    eager = fn(q, k, v, lens)
    assert len(traced) == n_traced, "eager took the loop form (it materializes the products)"
    oracle = fn(q.double(), k.double(), v.double(), lens)
    assert compiled.shape == oracle.shape and compiled.dtype == torch.float32
    err, bound = (compiled.double() - oracle).abs(), 2 * (eager.double() - oracle).abs() + 1e-6
    assert (err <= bound).all(), f"max excess {(err - bound).max():.3g}"
    short = lens < tq  # queries that see no key give zeros, as the eager reference
    if short.any():
        rows = torch.arange(tq)[None, :] < (tq - lens)[:, None]  # (B, Tq): query t sees no key
        assert (compiled.transpose(1, 2)[rows] == 0).all()
