"""C++/CUDA adapter of the sampling family (fastlm/ops/sampling.py): csrc/sampling.cu as the
``cuda`` backend of ``sample``."""

from __future__ import annotations

import torch

from fastlm.ops.backend import register_kernel


@register_kernel("sample", "cuda")
def _sample_cuda(logits, uniform, temperature, top_k, top_p, min_p):
    """The C++/CUDA kernel (csrc/sampling.cu): float32/float16/bfloat16 logits (float64 is
    computed in float32, as by the Triton kernel), contiguous inputs of the entry point's dtypes."""
    from fastlm._extension import load_extension

    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        logits = logits.float()
    tokens, logprobs, status = load_extension().sample(
        logits.contiguous(),
        uniform.to(torch.float64).contiguous(),
        temperature.to(torch.float32).contiguous(),
        top_k.to(torch.int64).contiguous(),
        top_p.to(torch.float32).contiguous(),
        min_p.to(torch.float32).contiguous(),
    )
    return tokens, logprobs, status
