"""Triton kernels of fastlm, installed as ``fastlm.kernels`` (never as a top-level ``kernels``).

One module per op family (attention, decode attention, sampling, LoRA, int8, norms and loss).
The op layer registers their launchers with ``fastlm.ops.register_kernel(op, "triton")``;
a kernel module itself imports nothing of fastlm.
"""
