"""Mixed-adapter LoRA batches (punica's SGMV idea) in Triton: each row uses its own adapter.

    y_i = x_i·Wᵀ + bias + s_a·(x_i·A_aᵀ)·B_aᵀ   with a = adapter_index[i]   (no LoRA term if a = -1)

x (M, K), W (N, K), A (n, R, K), B (n, N, R), scales (n,) float32, adapter_index (M,) in [-1, n).

The rows are sorted by adapter on the device (a stable argsort: no host sync, no data copy —
the kernels gather x rows through the permutation and scatter y rows back), which cuts the
batch into one contiguous segment per adapter; ``seg_start`` (n + 1,) holds their offsets.
Then the kernels of :mod:`.lora` run once for the whole batch, whatever the number of adapters:

- shrink: H_j = s_a·x_j·A_aᵀ, each row tile looping over the adapters present in it (with rows
  sorted, one or two);
- GEMM over all rows at once (W is read once per row tile, as for a single adapter) with the
  segmented epilogue acc += [a(j) = a]·H·B_aᵀ for each adapter a present in the tile;
- backward: the same shrink for G = s_a·dy·B_a, the dx GEMM with G·A_a epilogues, and the
  segmented reductions dA_a = Σ_{i∈a} G_iᵀ·x_i and dB_a = Σ_{i∈a} dy_iᵀ·H_i (one program grid
  over adapters × tiles × row splits).

The base GEMM is shared by all rows, so a batch mixing adapters costs the single-adapter time
plus, per tile, one rank-R epilogue dot per extra adapter present.
This module imports nothing of fastlm.
"""

from __future__ import annotations

import torch

from .lora import check_dtype, matmul, on_device, outer, rank_pad, rows2d, shrink


def segments(adapter_index: torch.Tensor, num_adapters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows (M,) int64: row order sorted by adapter, rows without one first; sorted adapter ids
    (M,) int32; seg_start (n + 1,) int32: adapter a's rows are rows[seg_start[a]:seg_start[a + 1]])."""
    index = adapter_index.to(torch.int64)
    rows = torch.argsort(index, stable=True)
    sorted_ids = index.index_select(0, rows).to(torch.int32)
    # bucket 0: rows without adapter; a fixed (n + 1,) shape (bincount's size depends on the data)
    counts = torch.zeros(num_adapters + 1, dtype=torch.int64, device=index.device)
    counts.scatter_add_(0, index + 1, torch.ones_like(index))
    seg_start = torch.cumsum(counts, dim=0).to(torch.int32)  # (n + 1,): start of a, then the end
    return rows, sorted_ids, seg_start


def _a_strides(lora_a: torch.Tensor, transposed: bool) -> tuple[int, int, int]:
    """Strides of A_a as D (K, R) (``transposed``, for the shrink) or as L (R, K) (for the epilogue)."""
    sa, sr, sk = lora_a.stride()
    return (sa, sk, sr) if transposed else (sa, sr, sk)


def lora_mixed_forward(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       scales: torch.Tensor, adapter_index: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) -> y (M, N) with each row's own adapter (see the module docstring)."""
    check_dtype(x, "lora_linear_mixed")
    n, k = weight.shape
    num_adapters, rank = lora_a.shape[0], lora_a.shape[1]
    rank_pad(rank)
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    x2 = rows2d(x, k)
    scales = scales.to(device=x.device, dtype=torch.float32).contiguous()
    rows, sorted_ids, _ = segments(adapter_index, num_adapters)
    sb, sn, sr = lora_b.stride()
    with on_device(x):
        h = shrink(x2, lora_a, _a_strides(lora_a, True), rank, scales, rows, sorted_ids)
        matmul(x2, weight, (weight.stride(1), weight.stride(0)), n, h, lora_b, (sb, sr, sn), bias, out, rows,
               sorted_ids)
    return out


def lora_mixed_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                        lora_b: torch.Tensor, scales: torch.Tensor, adapter_index: torch.Tensor,
                        bias: torch.Tensor | None, needs: list[bool]) -> list[torch.Tensor | None]:
    """[dx, dW, dA, dB, dbias] (None where not needed). With G_i = s_a·dy_i·B_a and
    H_i = s_a·x_i·A_aᵀ: dx_i = dy_i·W + G_i·A_a, dA_a = Σ_{i∈a} G_iᵀ·x_i, dB_a = Σ_{i∈a} dy_iᵀ·H_i."""
    need_x, need_w, need_a, need_b, need_bias = needs
    n, k = weight.shape
    num_adapters, rank = lora_a.shape[0], lora_a.shape[1]
    x2, dy = rows2d(x, k), rows2d(grad, n)
    scales = scales.to(device=x.device, dtype=torch.float32).contiguous()
    rows, sorted_ids, seg_start = segments(adapter_index, num_adapters)
    dx = d_w = d_a = d_b = d_bias = None
    sb, sn, sr = lora_b.stride()
    with on_device(x):
        if need_x or need_a:
            g = shrink(dy, lora_b, (sb, sn, sr), rank, scales, rows, sorted_ids)
            if need_x:
                dx = torch.empty((x2.shape[0], k), dtype=x.dtype, device=x.device)
                matmul(dy, weight, (weight.stride(0), weight.stride(1)), k, g, lora_a, _a_strides(lora_a, False),
                       None, dx, rows, sorted_ids)
                dx = dx.view(x.shape)
            if need_a:
                d_a = outer(g, x2, rank, k, seg_start, num_adapters, False, True, rows).to(lora_a.dtype)
        if need_b:
            h = shrink(x2, lora_a, _a_strides(lora_a, True), rank, scales, rows, sorted_ids)
            d_b = outer(dy, h, n, rank, seg_start, num_adapters, True, False, rows).to(lora_b.dtype)
    if need_w:
        d_w = (dy.float().t() @ x2.float()).to(weight.dtype)
    if need_bias and bias is not None:
        d_bias = dy.float().sum(dim=0).to(bias.dtype)
    return [dx, d_w, d_a, d_b, d_bias]
