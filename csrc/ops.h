// Declarations of the op entry points defined in the csrc/*.cu files (one file per op
// family), bound to Python in bindings.cpp. Each entry point checks its inputs (common.h),
// sets the device guard and launches on the current stream.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastlm {

// e.g. (issue 5):  at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// int8.cu: W8A8 linear. x (M, K) float32/float16/bfloat16 -> (xq int8 (M, K), sx float32 (M,)).
std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, const std::optional<at::Tensor>& smooth);
// y (M, N) = sx·w_scales·(xq·qweightᵀ) + bias; qweight int8 (N, K), w_scales float32 (N,).
at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& w_scales,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& smooth);

// sampling.cu: one token per row of logits (B, V) float32/float16/bfloat16 by temperature, top-k,
// top-p and min-p (fastlm/ops/sampling_reference.py), given uniform (B,) float64 and per-row
// temperature, top_p, min_p (B,) float32 and top_k (B,) int64.
// -> (tokens (B,) int64, log-probabilities (B,) float32, row status (B,) int32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> sample(const at::Tensor& logits, const at::Tensor& uniform,
                                                      const at::Tensor& temperature, const at::Tensor& top_k,
                                                      const at::Tensor& top_p, const at::Tensor& min_p);

}  // namespace fastlm
