"""Triton adapters, one module per op family: each registers the kernels of ``fastlm.kernels``
(kernels/ in a checkout) as the ``triton`` backend of its family's ops. Importing these modules
never imports triton: a kernel module is loaded on its first call."""

from fastlm.ops.triton import activations, attn, decode, int8, lora, losses, norms, rotary, sampling  # noqa: F401
