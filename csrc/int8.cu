// W8A8 linear on CUDA: per-token int8 quantization kernel -> cuBLASLt int8 GEMM (at::_int_mm,
// int32 accumulation) -> dequantizing epilogue kernel (scales and bias). The kernels live in the
// torch-free int8_kernels.cuh.
//
//   quantize_per_token(x (M, K), smooth (K,)?) -> (xq int8 (M, K), sx float32 (M,))
//   w8a8_linear(x (M, K), qweight int8 (N, K), w_scales float32 (N,), bias (N,)?, smooth (K,)?)
//     -> y (M, N) in x's dtype,  y = sx[m]·sw[n]·Σ_k xq[m, k]·qweight[n, k] + bias[n]
//
// cuBLASLt's int8 GEMM (at::_int_mm) needs M > 16 and K, N multiples of 8: the quantized
// activation is written into a zero-padded buffer, and a weight with K or N not a multiple of 8
// is zero-padded on every call (a copy: model layers normally need none).
#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common.h"
#include "int8_kernels.cuh"
#include "ops.h"

namespace fastlm {
namespace {

// Calls f(static_cast<T*>(nullptr)) with T the CUDA type of x's dtype (float, __half, __nv_bfloat16).
template <typename F>
void dispatch_activation(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(static_cast<float*>(nullptr));
      break;
    case at::kHalf:
      f(static_cast<__half*>(nullptr));
      break;
    case at::kBFloat16:
      f(static_cast<__nv_bfloat16*>(nullptr));
      break;
    default:
      TORCH_CHECK(false, "expected float32, float16 or bfloat16 activations, got ", dtype);
  }
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

void check_activation(const at::Tensor& x) {
  CHECK_INPUT(x);
  CHECK_DIM(x, 2);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) > 0, "x must have at least one column, got shape ", x.sizes());
}

void check_smooth(const std::optional<at::Tensor>& smooth, const at::Tensor& x) {
  if (!smooth.has_value()) return;
  const at::Tensor& s = *smooth;
  CHECK_INPUT(s);
  CHECK_DTYPE(s, at::kFloat);
  CHECK_SAME_DEVICE(s, x);
  TORCH_CHECK(s.dim() == 1 && s.size(0) == x.size(1), "smooth must have shape (", x.size(1), "), got ", s.sizes());
}

// Quantizes x (rows × cols) into q (rows_padded × cols_padded, zero padding) and scales (rows_padded).
void quantize_into(const at::Tensor& x, const std::optional<at::Tensor>& smooth, at::Tensor& q, at::Tensor& scales,
                   cudaStream_t stream) {
  const float* smooth_ptr = smooth.has_value() ? smooth->data_ptr<float>() : nullptr;
  dispatch_activation(x.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    int8::launch_quantize_per_token<T>(static_cast<const T*>(x.data_ptr()), x.stride(0), smooth_ptr,
                                       q.data_ptr<int8_t>(), q.stride(0), scales.data_ptr<float>(), x.size(0),
                                       q.size(0), x.size(1), q.size(1), stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, const std::optional<at::Tensor>& smooth) {
  check_activation(x);
  check_smooth(smooth, x);
  const at::cuda::OptionalCUDAGuard device_guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor q = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  quantize_into(x, smooth, q, scales, stream);
  return {q, scales};
}

at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& w_scales,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& smooth) {
  check_activation(x);
  CHECK_INPUT(qweight);
  CHECK_DTYPE(qweight, at::kChar);
  CHECK_DIM(qweight, 2);
  CHECK_SAME_DEVICE(x, qweight);
  TORCH_CHECK(qweight.size(1) == x.size(1), "qweight must have ", x.size(1), " columns (x's features), got shape ",
              qweight.sizes());
  CHECK_INPUT(w_scales);
  CHECK_DTYPE(w_scales, at::kFloat);
  CHECK_SAME_DEVICE(x, w_scales);
  TORCH_CHECK(w_scales.dim() == 1 && w_scales.size(0) == qweight.size(0), "w_scales must have shape (",
              qweight.size(0), "), got ", w_scales.sizes());
  if (bias.has_value()) {
    CHECK_INPUT(*bias);
    CHECK_SAME_DTYPE(x, *bias);
    CHECK_SAME_DEVICE(x, *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == qweight.size(0), "bias must have shape (", qweight.size(0),
                "), got ", bias->sizes());
  }
  check_smooth(smooth, x);

  const at::cuda::OptionalCUDAGuard device_guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  const int64_t m_pad = std::max<int64_t>(m, 17), k_pad = round_up(k, 8), n_pad = round_up(n, 8);

  at::Tensor xq = at::empty({m_pad, k_pad}, x.options().dtype(at::kChar));
  at::Tensor sx = at::empty({m_pad}, x.options().dtype(at::kFloat));
  quantize_into(x, smooth, xq, sx, stream);

  at::Tensor w = qweight;
  if (k_pad != k || n_pad != n) w = at::constant_pad_nd(qweight, {0, k_pad - k, 0, n_pad - n}, 0);
  const at::Tensor acc = at::_int_mm(xq, w.t());  // (m_pad, n_pad) int32, cuBLASLt int8 GEMM

  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, x.device().index()));
  dispatch_activation(x.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* bias_ptr = bias.has_value() ? static_cast<const T*>(bias->data_ptr()) : nullptr;
    int8::launch_dequantize<T>(acc.data_ptr<int32_t>(), acc.stride(0), sx.data_ptr<float>(),
                               w_scales.data_ptr<float>(), bias_ptr, static_cast<T*>(y.data_ptr()), y.stride(0), m,
                               n, num_sms, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace fastlm
