"""The launches fastlm makes on a GPU, as calls of the registered ``triton`` kernels of
fastlm.ops (``kernel_for(op, "triton")``, i.e. the wrappers in fastlm/ops/ and the launchers in
kernels/), for scripts/compile_kernels.py and tests/ops/test_grid_limits.py.

``compile_variants()``: the dtypes (fp16, bf16, fp32) and constexpr variants the wrappers launch
(head dims 64/128/256, causal, GQA, key padding, varlen, paged, split counts, int8 modes, LoRA
ranks, hidden sizes), at model-sized shapes (the shapes decide the launchers' tile choices and
triton's divisibility specialisation). ``grid_variants()``: the largest shapes the wrappers
accept along each grid axis (many sequences × heads, long sequences, big batches, many rows).

Each variant is ``(family, label, call)``; ``call(dev)`` builds its inputs on ``dev`` and
launches. Run inside ``fake_cuda.FakeCuda`` (FakeTensors: no memory is allocated).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import torch

import fastlm.ops  # noqa: F401  (registers the reference ops and the triton kernels)
import fastlm.ops.attention_triton  # noqa: F401
import fastlm.ops.decode_triton  # noqa: F401
import fastlm.ops.fused_loss  # noqa: F401
import fastlm.ops.int8_triton  # noqa: F401
import fastlm.ops.kv_append  # noqa: F401
import fastlm.ops.lora_triton  # noqa: F401
import fastlm.ops.sampling  # noqa: F401
import fastlm.ops.triton_fused  # noqa: F401
from fastlm.ops.backend import kernel_for, kernel_module

Variant = tuple[str, str, Callable[[torch.device], object]]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
HEAD_DIMS = (64, 128, 256)


def _e(dev, *shape, dtype=torch.float16):
    return torch.empty(*shape, device=dev, dtype=dtype)


# ---- attention (kernels/attention.py, attention_bwd.py) -----------------------------------------


def _attention(b, h, hkv, tq, tk, d, dtype, causal, key_lens, backward, deterministic=True, window=None,
               softcap=None):
    def call(dev):
        q, k, v = _e(dev, b, h, tq, d, dtype=dtype), _e(dev, b, hkv, tk, d, dtype=dtype), _e(dev, b, hkv, tk, d, dtype=dtype)
        lens = torch.empty(b, device=dev, dtype=torch.int32) if key_lens else None
        out, lse = kernel_for("attention", "triton")(q, k, v, causal, None, lens, window, softcap)
        if backward:
            mod = kernel_module("attention_bwd")
            mod.attention_backward(torch.empty_like(out), q, k, v, causal, None, lens, out, lse,
                                   (True, True, True), window=window, softcap=softcap, deterministic=deterministic)
    return call


def _attention_varlen(seqs, h, hkv, max_len, d, dtype, causal, backward):
    def call(dev):
        total = seqs * max_len
        q, k, v = (_e(dev, total, n, d, dtype=dtype) for n in (h, hkv, hkv))
        cu = torch.empty(seqs + 1, device=dev, dtype=torch.int32)
        out, lse = kernel_for("attention_varlen", "triton")(q, k, v, cu, cu, max_len, max_len, causal, None, None, None)
        if backward:
            kernel_for("attention_varlen_backward", "triton")(torch.empty_like(out), q, k, v, cu, cu, max_len, max_len,
                                                              causal, None, None, None, out, lse, (True, True, True))
    return call


def _decode(b, h, hkv, tq, cache_len, d, dtype, paged, window=None, softcap=None):
    def call(dev):
        q = _e(dev, b, h, tq, d, dtype=dtype)
        lens = torch.empty(b, device=dev, dtype=torch.int64)
        if paged:
            page = 16
            blocks = (cache_len + page - 1) // page
            pages = _e(dev, b * blocks, hkv, page, d, dtype=dtype)
            table = torch.empty(b, blocks, device=dev, dtype=torch.int32)
            kernel_for("decode_attention_paged", "triton")(q, pages, pages, table, lens, None, window, softcap)
        else:
            cache = _e(dev, b, hkv, cache_len, d, dtype=dtype)
            kernel_for("decode_attention", "triton")(q, cache, cache, lens, None, window, softcap)
    return call


def attention_variants() -> Iterator[Variant]:
    bf16, fp16, fp32 = DTYPES["bf16"], DTYPES["fp16"], DTYPES["fp32"]
    # bf16 over every head dim, causal or not (GQA group 4); fp32 over every head dim (causal);
    # fp16 (the same 16-bit tiles as bf16) at D=128; the other constexpr variants at bf16.
    points = [("bf16", bf16, d, c) for d in HEAD_DIMS for c in (False, True)]
    points += [("fp32", fp32, d, True) for d in HEAD_DIMS] + [("fp16", fp16, 128, True)]
    for name, dtype, d, causal in points:
        yield "attention", f"dense {name} D={d} causal={causal} group=4", _attention(
            2, 32, 8, 1024, 1024, d, dtype, causal, False, True)
    yield "attention", "dense bf16 D=128 causal=True group=1", _attention(2, 32, 32, 1024, 1024, 128, bf16, True, False, True)
    yield "attention", "dense bf16 D=128 key_lens", _attention(4, 16, 16, 512, 512, 128, bf16, False, True, True)
    yield "attention", "prefill bf16 D=128 Tq=17 Tk=1040 key_lens", _attention(2, 32, 8, 17, 1040, 128, bf16, True, True, False)
    yield "attention", "dense split-heads bf16 D=128 group=4", _attention(1, 32, 8, 512, 512, 128, bf16, True, False, True,
                                                                           deterministic=False)
    for d in (128, 256):
        yield "attention", f"varlen bf16 D={d} causal=True", _attention_varlen(8, 32, 8, 512, d, bf16, True, True)
    for name, dtype, d in [(n, t, d) for n, t in (("bf16", bf16), ("fp32", fp32)) for d in HEAD_DIMS]:  # Mistral/Gemma 2
        yield "attention", f"dense {name} D={d} window=4096 softcap=50", _attention(
            2, 32, 8, 1024, 1024, d, dtype, True, False, True, window=4096, softcap=50.0)


def decode_variants() -> Iterator[Variant]:
    for (name, dtype), d in itertools.product(DTYPES.items(), HEAD_DIMS):
        if name == "fp16" and d != 128:
            continue
        for group, tq, cache_len in ((1, 1, 4096), (4, 1, 4096), (8, 1, 32768), (4, 4, 4096), (8, 16, 2048)):
            label = f"{name} D={d} group={group} Tq={tq} L={cache_len}"
            yield "decode_attention", label, _decode(4, 32, 32 // group, tq, cache_len, d, dtype, False)
        yield "decode_attention", f"paged {name} D={d} group=4", _decode(4, 32, 8, 1, 4096, d, dtype, True)
        yield "decode_attention", f"{name} D={d} group=2 window=4096 softcap=50", _decode(
            4, 16, 8, 1, 8192, d, dtype, False, window=4096, softcap=50.0)


# ---- KV-cache append (kernels/kv_append.py) ------------------------------------------------------


def _rope_append(b, h, hkv, t, d, lmax, dtype, cache_dtype, theta):
    def call(dev):
        q, k = _e(dev, b, h, t, d, dtype=dtype), _e(dev, b, hkv, t, d, dtype=dtype)
        cache = _e(dev, b, hkv, lmax, d, dtype=cache_dtype)
        pos = torch.empty(b, t, device=dev, dtype=torch.int64)
        kernel_for("rope_append_kv", "triton")(q, k, torch.empty_like(k), pos, cache, cache, theta)
    return call


def kv_append_variants() -> Iterator[Variant]:
    for (name, dtype), d, theta in itertools.product(DTYPES.items(), HEAD_DIMS, (10000.0, None)):
        rot = "rope" if theta else "no-rotation (GPT-2)"
        yield "kv_append", f"{name} D={d} {rot} decode", _rope_append(8, 32, 8, 1, d, 4096, dtype, dtype, theta)
        yield "kv_append", f"{name} D={d} {rot} prefill", _rope_append(2, 32, 8, 333, d, 4096, dtype, dtype, theta)
    yield "kv_append", "fp32 D=128 rope fp16 cache", _rope_append(8, 32, 8, 1, 128, 4096, torch.float32, torch.float16, 1e4)


# ---- int8 (kernels/int8.py) ----------------------------------------------------------------------


def _int8_linear(m, n, k, dtype, groups, bias, backward):
    def call(dev):
        x = _e(dev, m, k, dtype=dtype)
        w = torch.empty(n, k, device=dev, dtype=torch.int8)
        scales = torch.empty((n,) if groups is None else (n, k // groups), device=dev, dtype=torch.float32)
        b = _e(dev, n, dtype=dtype) if bias else None
        y = kernel_for("int8_linear", "triton")(x, w, scales, b)
        if backward:
            kernel_for("int8_linear_backward", "triton")(torch.empty_like(y), x, w, scales, b, (True, bias))
    return call


def _w8a8(m, n, k, dtype, smooth, bias):
    def call(dev):
        x = _e(dev, m, k, dtype=dtype)
        w = torch.empty(n, k, device=dev, dtype=torch.int8)
        ws = torch.empty(n, device=dev, dtype=torch.float32)
        s = torch.empty(k, device=dev, dtype=torch.float32) if smooth else None
        b = _e(dev, n, dtype=dtype) if bias else None
        kernel_for("w8a8_linear", "triton")(x, w, ws, b, s)
    return call


def int8_variants() -> Iterator[Variant]:
    # Every mode at bf16; fp32 and fp16 (x's dtype only changes the loads and the epilogue) at
    # per-channel weights.
    for name, dtype in DTYPES.items():
        for groups in ((None, 128) if name == "bf16" else (None,)):
            gl = "per-channel" if groups is None else f"group={groups}"
            for m, mode in ((1, "decode M=1"), (16, "decode M=16"), (512, "prefill")):
                if name == "fp16" and m == 16:
                    continue
                yield "int8", f"w8 {name} {gl} {mode}", _int8_linear(m, 4096, 4096, dtype, groups, m == 512, m == 512)
        modes = ((16, True), (64, False), (512, True)) if name == "bf16" else ((16, True), (512, False))
        for m, smooth in modes:
            mode = "fused quant" if m <= 64 else "quantize + GEMM"
            yield "int8", f"w8a8 {name} M={m} {mode} smooth={smooth}", _w8a8(m, 4096, 4096, dtype, smooth, m == 512)
    yield "int8", "w8 bf16 per-channel decode split-K N=11008", _int8_linear(1, 11008, 4096, DTYPES["bf16"], None,
                                                                           False, False)


# ---- LoRA (kernels/lora.py, lora_sgmv.py) --------------------------------------------------------


def _lora(m, n, k, r, dtype, bias):
    def call(dev):
        x, w = _e(dev, m, k, dtype=dtype), _e(dev, n, k, dtype=dtype)
        a, bb = _e(dev, r, k, dtype=dtype), _e(dev, n, r, dtype=dtype)
        b = _e(dev, n, dtype=dtype) if bias else None
        y = kernel_for("lora_linear", "triton")(x, w, a, bb, 2.0, b)
        kernel_for("lora_linear_backward", "triton")(torch.empty_like(y), x, w, a, bb, 2.0, b,
                                                    (True, True, True, True, bias))
    return call


def _lora_mixed(m, n, k, r, adapters, dtype):
    def call(dev):
        x, w = _e(dev, m, k, dtype=dtype), _e(dev, n, k, dtype=dtype)
        a, bb = _e(dev, adapters, r, k, dtype=dtype), _e(dev, adapters, n, r, dtype=dtype)
        scales = torch.empty(adapters, device=dev, dtype=torch.float32)
        index = torch.empty(m, device=dev, dtype=torch.int64)
        y = kernel_for("lora_linear_mixed", "triton")(x, w, a, bb, scales, index, None)
        kernel_for("lora_linear_mixed_backward", "triton")(torch.empty_like(y), x, w, a, bb, scales, index, None,
                                                          (True, True, True, True, False))
    return call


def lora_variants() -> Iterator[Variant]:
    points = [("bf16", r) for r in (8, 64, 256)] + [("fp32", 8), ("fp32", 256), ("fp16", 64)]
    for name, r in points:
        dtype = DTYPES[name]
        yield "lora", f"dense {name} r={r} M=2048", _lora(2048, 4096, 4096, r, dtype, r == 8)
        if name == "bf16" and r == 64:
            yield "lora", f"dense {name} r={r} M=16", _lora(16, 4096, 4096, r, dtype, False)
            yield "lora", f"mixed {name} r={r} 4 adapters", _lora_mixed(512, 4096, 4096, r, 4, dtype)


# ---- training ops: RMSNorm, RoPE, SwiGLU, cross-entropy; sampling --------------------------------


def _rms_norm(m, n, dtype):
    def call(dev):
        x, w = _e(dev, m, n, dtype=dtype), _e(dev, n, dtype=dtype)
        kernel_for("rms_norm", "triton")(x, w, 1e-6)
        kernel_for("rms_norm_backward", "triton")(torch.empty_like(x), x, w, 1e-6, (True, True))
        kernel_for("rms_norm_backward", "triton")(torch.empty_like(x), x, w, 1e-6, (True, False))
    return call


def _rope(b, h, t, d, dtype, batched_positions):
    def call(dev):
        x = _e(dev, b, h, t, d, dtype=dtype)
        pos = torch.empty((b, t) if batched_positions else (t,), device=dev, dtype=torch.int64)
        kernel_for("rope", "triton")(x, pos, 10000.0)
        kernel_for("rope_backward", "triton")(torch.empty_like(x), x, pos, 10000.0, (True,))
    return call


def _swiglu(m, f, dtype):
    def call(dev):
        g = _e(dev, m, f, dtype=dtype)
        kernel_for("swiglu", "triton")(g, torch.empty_like(g))
        for needs in ((True, True), (True, False), (False, True)):
            kernel_for("swiglu_backward", "triton")(torch.empty_like(g), g, torch.empty_like(g), needs)
    return call


def _cross_entropy(rows, vocab, dtype, grad):
    def call(dev):
        logits = _e(dev, rows, vocab, dtype=dtype)
        targets = torch.empty(rows, device=dev, dtype=torch.int64)
        acc = torch.float32
        kernel_module("cross_entropy").cross_entropy_rows_(
            logits, targets, torch.empty(rows, device=dev, dtype=acc), torch.empty(1, device=dev, dtype=acc), -100, grad)
    return call


def _logprobs(rows, vocab, dtype, entropy, grad):
    def call(dev):
        f32 = dict(device=dev, dtype=torch.float32)
        z, tokens = _e(dev, rows, vocab, dtype=dtype), torch.empty(rows, device=dev, dtype=torch.int64)
        vec = (lambda: torch.empty(rows, **f32)) if entropy else (lambda: None)
        module = kernel_module("logprobs")
        if grad:
            module.logprobs_grad_rows_(z, tokens, torch.empty(rows, **f32), vec(), torch.empty(rows, **f32), vec(),
                                       0.7, -100)
        else:
            module.logprobs_rows(z, tokens, torch.empty(2 if entropy else 1, rows, **f32), torch.empty(rows, **f32),
                                 0.7, -100)
    return call


def _distill(rows, vocab, dtype, divergence, labels, grad):
    def call(dev):
        f32 = dict(device=dev, dtype=torch.float32)
        y = torch.empty(rows, device=dev, dtype=torch.int64) if labels else None
        kernel_module("logprobs").distill_rows_(_e(dev, rows, vocab, dtype=dtype), _e(dev, rows, vocab, dtype=dtype), y,
                                                torch.empty(rows, **f32), torch.empty(1, **f32), 2.0, divergence, 0.5,
                                                0.5 if labels else 1.0, -100, grad)
    return call


def _sample(batch, vocab, dtype):
    def call(dev):
        f32 = dict(device=dev, dtype=torch.float32)
        kernel_for("sample", "triton")(_e(dev, batch, vocab, dtype=dtype), torch.empty(batch, device=dev, dtype=torch.float64),
                                       torch.empty(batch, **f32), torch.empty(batch, device=dev, dtype=torch.int64),
                                       torch.empty(batch, **f32), torch.empty(batch, **f32))
    return call


def training_variants() -> Iterator[Variant]:
    for name, dtype in DTYPES.items():
        for n in (768, 4096, 8192, 16384, 65536):
            yield "norms", f"rms_norm {name} N={n}", _rms_norm(4096, n, dtype)
        for d in HEAD_DIMS:
            yield "rope", f"rope {name} D={d}", _rope(2, 32, 2048, d, dtype, False)
        yield "rope", f"rope {name} D=128 per-batch positions", _rope(2, 32, 2048, 128, dtype, True)
        yield "swiglu", f"swiglu {name} F=11008", _swiglu(4096, 11008, dtype)
        yield "swiglu", f"swiglu {name} F=300", _swiglu(16, 300, dtype)
        for vocab in (32000, 128256, 50257):
            yield "cross_entropy", f"cross_entropy {name} V={vocab}", _cross_entropy(2048, vocab, dtype, True)
        yield "cross_entropy", f"cross_entropy {name} V=32000 loss only", _cross_entropy(2048, 32000, dtype, False)
        for vocab in (32000, 128256):
            for entropy, grad in itertools.product((False, True), (False, True)):
                what = ("backward" if grad else "forward") + (" +entropy" if entropy else "")
                yield "logprobs", f"linear_logprobs {what} {name} V={vocab}", _logprobs(2048, vocab, dtype, entropy, grad)
            for divergence in ("forward_kl", "reverse_kl", "jsd"):
                yield "logprobs", f"distill {divergence} {name} V={vocab}", _distill(2048, vocab, dtype, divergence,
                                                                                      True, True)
            yield "logprobs", f"distill forward_kl no labels loss only {name} V={vocab}", _distill(
                2048, vocab, dtype, "forward_kl", False, False)
        for vocab in (32000, 128256, 151936, 256):
            yield "sampling", f"sample {name} V={vocab}", _sample(64, vocab, dtype)


def compile_variants() -> list[Variant]:
    """Every variant the compile check builds."""
    return [*attention_variants(), *decode_variants(), *kv_append_variants(), *int8_variants(), *lora_variants(),
            *training_variants()]


# ---- the largest shapes along each grid axis -----------------------------------------------------


def grid_variants() -> list[Variant]:
    """Shapes the wrappers accept that stretch each grid axis: 2,048 sequences × 32 heads,
    128k-token sequences, large batches and row counts (bf16, the common dtype)."""
    bf16 = torch.bfloat16
    return [
        ("attention", "dense B=2048 H=32 T=128", _attention(2048, 32, 32, 128, 128, 128, bf16, True, False, True)),
        ("attention", "dense B=4096 H=32 GQA T=64", _attention(4096, 32, 8, 64, 64, 64, bf16, False, False, True)),
        ("attention", "dense B=1 H=32 T=131072", _attention(1, 32, 8, 131072, 131072, 128, bf16, True, False, True)),
        ("attention", "split-heads B=2048 H=32 GQA", _attention(2048, 32, 8, 64, 64, 128, bf16, False, False, True,
                                                                deterministic=False)),
        ("attention", "varlen 2048 seqs × 32 heads", _attention_varlen(2048, 32, 8, 128, 128, bf16, True, True)),
        ("decode_attention", "B=4096 Hkv=8 L=4096", _decode(4096, 32, 8, 1, 4096, 128, bf16, False)),
        ("decode_attention", "B=8 Hkv=8 L=1M", _decode(8, 32, 8, 1, 1 << 20, 128, bf16, False)),
        ("decode_attention", "paged B=4096", _decode(4096, 32, 8, 1, 4096, 128, bf16, True)),
        ("kv_append", "B=4096 T=1 H=32", _rope_append(4096, 32, 8, 1, 128, 4096, bf16, bf16, 1e4)),
        ("kv_append", "B=64 T=32768 prefill", _rope_append(64, 32, 8, 32768, 128, 32768, bf16, bf16, 1e4)),
        ("kv_append", "B=4096 no rotation", _rope_append(4096, 12, 12, 1, 64, 1024, bf16, bf16, None)),
        ("int8", "w8 prefill M=1M", _int8_linear(1 << 20, 4096, 4096, bf16, None, True, True)),
        ("int8", "w8 decode N=256k", _int8_linear(1, 1 << 18, 4096, bf16, None, False, False)),
        ("int8", "w8a8 M=1M", _w8a8(1 << 20, 4096, 4096, bf16, True, False)),
        ("lora", "dense M=1M", _lora(1 << 20, 4096, 4096, 16, bf16, False)),
        ("lora", "mixed M=1M 64 adapters", _lora_mixed(1 << 20, 4096, 4096, 16, 64, bf16)),
        ("norms", "rms_norm M=16M N=4096", _rms_norm(1 << 24, 4096, bf16)),
        ("rope", "rope B=4096 T=8192", _rope(4096, 32, 8192, 128, bf16, True)),
        ("swiglu", "swiglu 2^33 elements", _swiglu(1 << 20, 8192, bf16)),
        ("cross_entropy", "cross_entropy 1M rows", _cross_entropy(1 << 20, 32000, bf16, True)),
        ("logprobs", "linear_logprobs 1M rows", _logprobs(1 << 20, 32000, bf16, True, True)),
        ("logprobs", "distill 1M rows", _distill(1 << 20, 32000, bf16, "jsd", True, True)),
        ("sampling", "sample B=1M", _sample(1 << 20, 32000, bf16)),
    ]
