// fastlm::sample on CUDA: the entry point (input checks, device guard, current stream) of the
// fused sampling kernel in sampling_kernels.cuh. Registered as the `cuda` backend of the
// `fastlm::sample` custom op by fastlm/ops/sampling.py.
#include <cstdint>
#include <tuple>

#include "common.h"
#include "ops.h"
#include "sampling_kernels.cuh"

namespace fastlm {

namespace {

// A per-row parameter: a contiguous (B,) CUDA tensor of `dtype` on logits' device.
void check_row_param(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Tensor& logits) {
  TORCH_CHECK(t.is_cuda(), "sample: ", name, " must be a CUDA tensor, got a tensor on ", t.device());
  TORCH_CHECK(t.device() == logits.device(), "sample: ", name, " must be on logits' device ", logits.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "sample: ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0), "sample: ", name, " must have shape (", logits.size(0),
              ",) (one value per row of logits), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "sample: ", name, " must be contiguous, got strides ", t.strides());
}

sampling::LogitsType logits_type(const at::Tensor& logits) {
  const at::ScalarType dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "sample: logits must be float32, float16 or bfloat16, got ", dtype);
  if (dtype == at::kFloat) return sampling::LogitsType::kFloat32;
  return dtype == at::kHalf ? sampling::LogitsType::kFloat16 : sampling::LogitsType::kBFloat16;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample(const at::Tensor& logits, const at::Tensor& uniform,
                                                      const at::Tensor& temperature, const at::Tensor& top_k,
                                                      const at::Tensor& top_p, const at::Tensor& min_p) {
  CHECK_INPUT(logits);
  CHECK_DIM(logits, 2);
  const sampling::LogitsType type = logits_type(logits);
  const int64_t batch = logits.size(0);
  const int64_t vocab = logits.size(1);
  TORCH_CHECK(batch > 0 && vocab > 0, "sample: logits must be a non-empty (B, V) tensor, got shape ", logits.sizes());
  TORCH_CHECK(vocab < INT32_MAX, "sample: a vocabulary of ", vocab, " does not fit int32 indices");
  TORCH_CHECK(batch <= INT32_MAX, "sample: a batch of ", batch, " rows exceeds the grid limit");
  check_row_param(uniform, "uniform", at::kDouble, logits);
  check_row_param(temperature, "temperature", at::kFloat, logits);
  check_row_param(top_k, "top_k", at::kLong, logits);
  check_row_param(top_p, "top_p", at::kFloat, logits);
  check_row_param(min_p, "min_p", at::kFloat, logits);

  const c10::cuda::OptionalCUDAGuard device_guard(logits.device());
  at::Tensor tokens = at::empty({batch}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({batch}, logits.options().dtype(at::kFloat));
  at::Tensor status = at::empty({batch}, logits.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  sampling::launch_sample(type, logits.data_ptr(), logits.stride(0), batch, static_cast<int>(vocab),
                          uniform.data_ptr<double>(), temperature.data_ptr<float>(), top_k.data_ptr<int64_t>(),
                          top_p.data_ptr<float>(), min_p.data_ptr<float>(), tokens.data_ptr<int64_t>(),
                          logprobs.data_ptr<float>(), status.data_ptr<int32_t>(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {tokens, logprobs, status};
}

}  // namespace fastlm
