"""Int8 inference (pytest-benchmark): decode throughput of dense vs int8 weight-only vs W8A8 models,
and the int8 GEMMs against the bf16 matmul and ``torch._int_mm``.

``test_decode`` — greedy ``fastlm.generate`` (no EOS: every row makes exactly ``new`` tokens) of
Llama-shaped models built from the same seed, so every variant has the same weights: ``dense``
(the model dtype: bf16 on CUDA, fp32 on CPU), ``int8_weight_only`` and ``w8a8`` (per-channel
int8 weights, dynamic per-token int8 activations). One group per (model, batch): the dense model
is the peer; ``tokens`` = batch·new per call (tokens/s), ``weight_mb`` (the model's weight
bytes), ``peak_mb`` (memory allocated during one generate above the weights, from the fixture).
Shapes: CUDA llama-1b and llama-7b at batch 1 and 16, prompt 128, 128 new tokens (quick:
llama-1b only); CPU the tiny preset at batch 1 and 16, prompt 16, 16 new tokens (quick: batch 1).
A variant that does not fit in memory is skipped with the allocator's message.

``test_matmul`` — y = x·Wᵀ for x (M, K) and W (N, K) at Llama-7B's projection shapes (prefill,
M ≥ 2048: (4096, 4096, 4096), (2048, 4096, 11008), (2048, 11008, 4096); decode rows M = 1, 16;
quick: (4096, 4096, 4096) and (1, 4096, 4096)) on CUDA, (256, 512, 512) and (1, 512, 512) on CPU.
One group per shape, every case with ``flops`` = 2·M·N·K (TFLOP/s; TOPS for the int8 cases) and,
at M ≤ 16 where the weight read dominates, ``bytes`` = the weight bytes (N·K int8, or N·K·2 in
bf16: GB/s):

- ``F.linear`` — the matmul in the model dtype: the peer of every fastlm case;
- ``torch._int_mm`` — the bare int8 GEMM of torch (cuBLASLt on CUDA; CUDA needs M > 16 and K, N
  multiples of 8), on per-token quantized x and the int8 weight;
- ``w8a8_linear[<backend>]`` — fused per-token quantization + int8 GEMM + dequantizing epilogue;
- ``int8_linear[<backend>]`` — the weight-only int8 linear;
- ``w8a8_matmul[triton]`` — the Triton int8 GEMM + epilogue on already quantized x: peer
  ``torch._int_mm``.

Backends: ``reference``, ``triton``, ``cuda`` where available; on CPU only ``reference`` runs (the
Triton interpreter is not a performance measurement). fastlm cases record ``max_abs_diff`` from
the reference backend's output (``w8a8_matmul``: from the float64 product of its int8
operands). Issue targets on an H100: int8 weight-only batch-1 decode ≥ 1.8× bf16; W8A8 ≥ 1.5×
bf16 TFLOP/s at M ≥ 2048. Figures are whatever a run measures, on the device named in its JSON.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastlm
from bench.conftest import DEVICE, QUICK
from fastlm import ops
from fastlm.ops.int8 import quantize_per_token_reference

GPU = DEVICE == "cuda"
DTYPE = torch.bfloat16 if GPU else torch.float32
DTYPE_NAME = str(DTYPE).removeprefix("torch.")
VARIANTS = ("dense", "int8_weight_only", "w8a8")
BACKENDS = ("reference", "triton", "cuda")


def decode_cases() -> list[tuple[str, int, int, int]]:
    """(preset, batch, prompt_len, new_tokens) for this device and BENCH_QUICK."""
    if GPU:
        cases = [("llama-1b", 1, 128, 128), ("llama-1b", 16, 128, 128), ("llama-7b", 1, 128, 128),
                 ("llama-7b", 16, 128, 128)]
        return cases[:2] if QUICK else cases
    cases = [("tiny", 1, 16, 16), ("tiny", 16, 16, 16)]
    return cases[:1] if QUICK else cases


def matmul_shapes() -> list[tuple[int, int, int]]:
    """(M, K, N): prefill shapes of Llama-7B's projections, then decode rows M = 1, 16."""
    if GPU:
        shapes = [(4096, 4096, 4096), (2048, 4096, 11008), (2048, 11008, 4096), (1, 4096, 4096),
                  (16, 4096, 4096), (1, 4096, 11008), (1, 11008, 4096)]
        return shapes[:1] + shapes[3:4] if QUICK else shapes
    return [(256, 512, 512), (1, 512, 512)]


# ---- decode -------------------------------------------------------------------------------------

_MODEL: dict = {}  # the one model alive: {"key": (preset, variant), "model": Model}


def build(preset: str, variant: str) -> fastlm.Model:
    """The preset's model from seed 0 in DTYPE on DEVICE, quantized to ``variant`` unless dense."""
    from fastlm.quant import quantize

    torch.manual_seed(0)  # same weights for every variant
    with torch.device(DEVICE):
        model = fastlm.Model(fastlm.preset(preset))
    model = model.to(DTYPE).eval()
    if variant != "dense":
        quantize(model, variant)
    return model


def _model(preset: str, variant: str) -> fastlm.Model:
    """Built once per (preset, variant); the previous one is freed first (the cases run in order)."""
    if _MODEL.get("key") != (preset, variant):
        _MODEL.clear()
        if GPU:
            torch.cuda.empty_cache()
        try:
            _MODEL["model"] = build(preset, variant)
        except torch.OutOfMemoryError as err:
            pytest.skip(f"{preset} {variant} does not fit: {str(err).splitlines()[0]}")
        _MODEL["key"] = (preset, variant)
    return _MODEL["model"]


DECODE = [(preset, variant, batch, prompt, new) for preset in dict.fromkeys(c[0] for c in decode_cases())
          for variant in VARIANTS for p, batch, prompt, new in decode_cases() if p == preset]


@pytest.mark.parametrize("preset,variant,batch,prompt_len,new", DECODE,
                         ids=[f"{p}-{v}-b{b}" for p, v, b, _, _ in DECODE])
def test_decode(measure, preset, variant, batch, prompt_len, new):
    from fastlm.quant import model_bytes

    model = _model(preset, variant)
    torch.manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=DEVICE)

    def decode():
        return fastlm.generate(model, prompt, max_new_tokens=new, eos_token_id=None)

    out = decode()
    assert tuple(out.shape) == (batch, prompt_len + new), f"generate returned {tuple(out.shape)}"
    try:
        measure(decode, group=f"decode {preset} b{batch} prompt{prompt_len} new{new} {DTYPE_NAME}", impl=variant,
                peer="dense", warmup=0, tokens=batch * new, weight_mb=round(model_bytes(model) / 2**20, 2),
                model=preset, batch=batch, dtype=DTYPE_NAME)
    except torch.OutOfMemoryError as err:
        pytest.skip(f"{preset} {variant} batch {batch} does not fit: {str(err).splitlines()[0]}")


# ---- matmul -------------------------------------------------------------------------------------


def _operands(m: int, k: int, n: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
    w = torch.randn(n, k, device=DEVICE, dtype=DTYPE) / k**0.5
    q, ws = ops.quantize_int8(w)
    xq, sx = quantize_per_token_reference(x, None)
    return dict(x=x, w=w, q=q, ws=ws, xq=xq, sx=sx)


def _backend_ok(backend: str) -> None:
    """Skip (with the reason) a backend this run does not measure."""
    ok, why = ops.backend_status(backend, DEVICE)
    if not ok:
        pytest.skip(f"{backend} backend unavailable: {why}")
    if backend != "reference" and not GPU:
        pytest.skip("Triton interpreter / CPU: not a performance measurement")


def _forced(backend: str, fn):
    def call():
        with fastlm.use_backend(backend):
            return fn()
    return call


def _cases(d: dict) -> dict:
    """impl -> (call, peer, is_int8, reference call or None): every case of one shape."""
    x, w, q, ws, xq, sx = d["x"], d["w"], d["q"], d["ws"], d["xq"], d["sx"]
    cases = {"F.linear": (lambda: F.linear(x, w), None, False, None),
             "torch._int_mm": (lambda: torch._int_mm(xq, q.t()), "F.linear", True, None)}
    for backend in BACKENDS:
        cases[f"w8a8_linear[{backend}]"] = (_forced(backend, lambda: ops.w8a8_linear(x, q, ws)), "F.linear", True,
                                            _forced("reference", lambda: ops.w8a8_linear(x, q, ws)))
        cases[f"int8_linear[{backend}]"] = (_forced(backend, lambda: ops.int8_linear(x, q, ws)), "F.linear", True,
                                            _forced("reference", lambda: ops.int8_linear(x, q, ws)))

    def epilogue():
        from fastlm.ops.backend import kernel_module
        return kernel_module("int8").w8a8_matmul(xq, sx, q, ws, None, None, DTYPE)

    def exact():  # float64 holds every int8 dot product exactly; no M > 16 limit as torch._int_mm has on CUDA
        return ((xq.double() @ q.double().t()) * sx.double()[:, None] * ws.double()[None, :]).to(DTYPE)

    cases["w8a8_matmul[triton]"] = (epilogue, "torch._int_mm", True, exact)
    return cases


IMPLS = ["F.linear", "torch._int_mm", *(f"{op}[{b}]" for b in BACKENDS for op in ("w8a8_linear", "int8_linear")),
         "w8a8_matmul[triton]"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m,k,n", matmul_shapes(), ids=[f"{m}x{k}x{n}" for m, k, n in matmul_shapes()])
def test_matmul(measure, m, k, n, impl):
    if impl.endswith("]"):
        _backend_ok(impl[impl.index("[") + 1:-1])
    if impl == "torch._int_mm" and GPU and not (m > 16 and k % 8 == 0 and n % 8 == 0):
        pytest.skip("torch._int_mm on CUDA needs M > 16 and K, N multiples of 8")
    d = _operands(m, k, n)
    fn, peer, int8, reference = _cases(d)[impl]
    info = dict(shape=f"{m}x{k}x{n}", dtype=DTYPE_NAME, flops=2.0 * m * n * k)
    if m <= 16:  # memory-bound: the weight read dominates
        info["bytes"] = float(n * k * (1 if int8 else d["w"].element_size()))
    try:
        out = fn()
    except NotImplementedError as err:
        pytest.skip(f"not implemented: {err}")
    if reference is not None:
        info["max_abs_diff"] = float((out.float() - reference().float()).abs().max())
    measure(fn, group=f"matmul {m}x{k}x{n} {DTYPE_NAME}", impl=impl, peer=peer, warmup=0, **info)
