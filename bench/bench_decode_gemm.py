"""The linears of a CPU decode step: ``F.linear`` vs prepacked weights (pytest-benchmark).

    python -m bench.run --device cpu --only bench_decode_gemm   # or: pytest bench/bench_decode_gemm.py --benchmark-only

What :mod:`fastlm.decoding.packed` chooses between. One group per (model, batch): one call
runs every linear of a decode step of the preset — per layer the fused q/k/v, o, fused
gate/up and down projections, then the head — on fresh weights of the preset's shapes, in
order, so the weights stream from memory as in a real step (a group's weights are larger
than the caches), float32, one case per GEMM:

- ``mm``: ``F.linear`` on the plain (out, in) weight (MKL's sgemm; what transformers and an
  unpacked step run) — the peer;
- ``onednn``: ``mkldnn._linear_pointwise`` over weights packed by ``mkldnn._reorder_linear_weight``;
- ``mkl``: ``mkl._mkl_linear`` over weights packed by ``mkl._mkl_reorder_linear_weight`` for
  the group's batch;
- ``fastlm``: fastlm's AVX-512 skinny GEMM (``torch.ops.fastlm_cpu.skinny_linear``,
  :mod:`fastlm.decoding.cpu_gemm`) over weights packed into 16-column panels, where it runs
  (AVX-512 and a C++ compiler: built on first use);
- ``read``: ``torch.sum`` of every weight — no GEMM, one read of the same bytes: what streaming
  the weights alone costs on this machine (a floor for any step that reads them all once).

``bytes`` = the weights' bytes per call (the report's GB/s). Each case's outputs are checked
against ``mm``'s first (float32 rounding: |Δ| ≤ 1e-3). CPU only (CUDA runs skip): on the GPU
the step's GEMMs are cuBLAS/Triton and nothing is packed. One intra-op thread, as bench_decode.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastlm
from bench.conftest import DEVICE, QUICK, OneAtATime
from fastlm.decoding import cpu_gemm

if DEVICE == "cpu":
    torch.set_num_threads(1)
SHAPES = [("tiny", 1), ("tiny", 8), ("small", 1), ("small", 8)]
SHAPES = SHAPES[:2] if QUICK else SHAPES
IMPLS = ("mm", "onednn", "mkl", "fastlm", "read")
PEER = "mm"


def linear_shapes(preset: str) -> list[tuple[int, int]]:
    """(out, in) of every linear of one decode step of ``preset``, in order."""
    c = fastlm.preset(preset)
    qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    layer = [(qkv, c.hidden_size), (c.hidden_size, c.num_heads * c.head_dim),
             (2 * c.intermediate_size, c.hidden_size), (c.hidden_size, c.intermediate_size)]
    return layer * c.num_layers + [(c.vocab_size, c.hidden_size)]


class Group:
    """Weights of one preset and the inputs of one batch; each impl's call over all of them."""

    def __init__(self, preset: str, batch: int):
        torch.manual_seed(0)
        self.weights = [torch.randn(out, inp) / inp ** 0.5 for out, inp in linear_shapes(preset)]
        self.inputs = {inp: torch.randn(batch, inp) for inp in {w.shape[1] for w in self.weights}}
        self.bytes = sum(w.numel() * w.element_size() for w in self.weights)
        self.batch = batch
        self.calls = {"mm": self._mm()}
        if torch.backends.mkldnn.is_available():
            self.calls["onednn"] = self._onednn()
        if torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"):
            self.calls["mkl"] = self._mkl()
        if cpu_gemm.available():
            self.calls["fastlm"] = self._fastlm()
        want = self.calls["mm"]()
        for name, call in self.calls.items():  # (read is not a product: added after the check)
            got = call()
            assert all((a - b).abs().max() <= 1e-3 for a, b in zip(got, want)), f"{name} differs from mm"
        self.calls["read"] = lambda: [w.sum() for w in self.weights]

    def _mm(self):
        pairs = [(self.inputs[w.shape[1]], w) for w in self.weights]
        return lambda: [F.linear(x, w) for x, w in pairs]

    def _onednn(self):
        pairs = [(self.inputs[w.shape[1]], torch.ops.mkldnn._reorder_linear_weight(w)) for w in self.weights]
        return lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for x, p in pairs]

    def _mkl(self):
        b = self.batch
        triples = [(self.inputs[w.shape[1]], torch.ops.mkl._mkl_reorder_linear_weight(w, b), w) for w in self.weights]
        return lambda: [torch.ops.mkl._mkl_linear(x, p, w, None, b) for x, p, w in triples]

    def _fastlm(self):
        triples = [(self.inputs[w.shape[1]], cpu_gemm.pack_weight(w), w.shape[0]) for w in self.weights]
        return lambda: [cpu_gemm.skinny_linear(x, p, n) for x, p, n in triples]


_group = OneAtATime(Group)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{p}-b{b}" for p, b in SHAPES])
def test_decode_linears(measure, shape, impl):
    if DEVICE != "cpu":
        pytest.skip("prepacked CPU weights: CPU only")
    group = _group(shape)
    if impl not in group.calls:
        pytest.skip(f"no {impl} packed GEMM here" + (f" ({cpu_gemm.status()[1]})" if impl == "fastlm" else ""))
    preset, batch = shape
    measure(group.calls[impl], group=f"decode linears {preset} batch {batch}", impl=impl, peer=PEER,
            model=preset, batch=batch, dtype="float32", bytes=group.bytes, warmup=2)
