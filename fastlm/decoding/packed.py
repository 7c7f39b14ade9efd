"""Prepacked CPU weights for the linears of the eager decode step: :func:`packed_linears`.

A decode step multiplies a few rows (the batch) by every weight of the model, so on the CPU it
is a sweep of skinny GEMMs bound by how fast the weights stream from memory. ``F.linear``'s
MKL sgemm reads the (out, in) weight in its plain layout; oneDNN and MKL can first copy a
weight into their own blocked layout once ("prepacking", as inductor's frozen graphs and
IPEX do) and then run each step's GEMM over it, and so does fastlm's own AVX-512 kernel
(:mod:`fastlm.decoding.cpu_gemm`: 16-column panels streamed once while the rows accumulate in
registers). One sweep of every linear of a decode step, in order, float32, one thread, on this
project's CPU (AMD EPYC; bench/bench_decode_gemm.py, bench/results/cpu/bench_decode_gemm.md;
end to end: bench_decode.md), ms:

=============  ========  =================  ==============  ========  ==================
model, batch   ``mm``    oneDNN prepacked   MKL prepacked   fastlm    reading them (sum)
=============  ========  =================  ==============  ========  ==================
27M, 1         11.6      9.7                8.2             5.4       5.7
27M, 8         18.2      9.7                18.4            7.1       4.5
4M, 1          1.93      1.03               1.29            0.44      0.35
4M, 8          2.93      1.43               2.37            0.94      0.38
=============  ========  =================  ==============  ========  ==================

so up to :data:`fastlm.decoding.cpu_gemm.MAX_ROWS` rows the step runs fastlm's kernel where it
runs (AVX-512 and a C++ compiler to build it; :func:`decode_pack_kind`); otherwise (or with
``FASTLM_CPU_KERNELS=0``) a batch of one uses MKL's packed GEMM (``mkl._mkl_linear``, which
needs the batch size it was packed for) and larger batches oneDNN's
(``mkldnn._linear_pointwise``, any batch). The sums are those of the same products in another
order: logits differ from ``F.linear``'s by float32 rounding (tests/model/test_packed_decode.py
checks each against float64).

Packing copies every weight once: the packs are kept per model, for the weights' version
(:func:`fastlm.decoding.step.weights_version`: in-place changes and optimizer steps included)
and kind, and rebuilt when either changes; a model over :data:`PACK_MAX_BYTES` of linear
weights is not packed (no second copy of a large model), nor one on another device or dtype,
nor where neither fastlm's kernel nor a library GEMM is there. :func:`release_packs` drops a model's packs.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

#: models whose linear weights take more bytes decode over their plain weights (``mm``): a
#: pack is a second copy of every weight.
PACK_MAX_BYTES = 2 * 2**30

# model -> (key, {module name: packed call}); the calls hold the weights, not the modules, so
# the model can be collected
_PACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def pack_kind(batch: int) -> str | None:
    """The prepacked GEMM used for ``batch`` rows on this torch build: "mkl" (batch 1),
    "onednn", or None where neither library is there or oneDNN is switched off."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return None
    if batch == 1 and torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"):
        return "mkl"
    return "onednn"


def decode_pack_kind(batch: int) -> str | None:
    """The packed GEMM of an eager decode step of ``batch`` rows: "fastlm" (fastlm's AVX-512
    skinny GEMM, :mod:`fastlm.decoding.cpu_gemm`) up to its ``MAX_ROWS`` where it runs here,
    else :func:`pack_kind`'s library GEMM."""
    from fastlm.decoding import cpu_gemm

    if batch <= cpu_gemm.MAX_ROWS and cpu_gemm.available():
        return "fastlm"
    return pack_kind(batch)


def _packed(linear: nn.Linear, kind: str):
    """h (B, in) -> (B, out) float32, computed over a packed copy of ``linear``'s weight (taken
    now: a later change to the weight is not seen; no autograd through it)."""
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    if kind == "fastlm":
        from fastlm.decoding import cpu_gemm

        panels, out_features = cpu_gemm.pack_weight(weight), weight.shape[0]
        skinny_linear = torch.ops.fastlm_cpu.skinny_linear.default  # looked up once, not per step
        return lambda h: skinny_linear(h, panels, out_features, bias)
    if kind == "mkl":
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, 1)
        return lambda h: torch.ops.mkl._mkl_linear(h, packed, weight, bias, 1)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight)
    return lambda h: torch.ops.mkldnn._linear_pointwise(h, packed, bias, "none", [], "")


def packed_linears(model: nn.Module, batch: int, version: int) -> dict[nn.Linear, object]:
    """{plain nn.Linear of ``model``: its packed call h (B, in) -> (B, out)} for decode steps
    of ``batch`` rows, for the weights of ``version`` (:func:`fastlm.decoding.step.weights_version`);
    empty where packing does not apply (see the module docstring). Kept on the model: a later
    call with the same version and kind returns the same packs."""
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    kind = decode_pack_kind(batch)
    weights = [m.weight for m in linears.values()]
    if (kind is None or not linears or torch.is_grad_enabled()
            or any(w.device.type != "cpu" or w.dtype != torch.float32 for w in weights)
            or sum(w.numel() * w.element_size() for w in weights) > PACK_MAX_BYTES):
        _PACKS.pop(model, None)  # e.g. moved to another device since: its old packs go
        return {}
    key = (version, kind, tuple(linears))  # a linear replaced by a wrapper changes the names
    kept = _PACKS.get(model)
    if kept is None or kept[0] != key:
        _PACKS.pop(model, None)  # the old packs go before the new ones are made: one copy at a time
        with torch.no_grad():
            kept = _PACKS[model] = (key, {name: _packed(m, kind) for name, m in linears.items()})
    return {linears[name]: call for name, call in kept[1].items()}


def release_packs(model: nn.Module) -> None:
    """Free the packed weights kept for ``model``."""
    _PACKS.pop(model, None)
