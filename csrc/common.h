// Input checks and CUDA helpers shared by the fastlm ops in csrc/.
//
// Every op entry point validates its inputs before launching anything:
//   CHECK_CUDA(q); CHECK_CONTIGUOUS(q); CHECK_DTYPE(q, at::kBFloat16); CHECK_DIM(q, 4);
//   CHECK_SAME_DEVICE(q, k); CHECK_SAME_DTYPE(q, k);
//   const at::cuda::OptionalCUDAGuard device_guard(q.device());
//   cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
//   my_kernel<<<grid, block, smem, stream>>>(...);
//   C10_CUDA_KERNEL_LAUNCH_CHECK();
#pragma once

#include <ATen/ATen.h>
// c10 headers only: ATen/cuda/CUDAContext.h would also need the cuBLAS/cuSPARSE headers,
// which minimal CUDA toolkits lack.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

// x must live on a CUDA device.
#define CHECK_CUDA(x) \
  TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor, got a tensor on ", (x).device())

// x must be contiguous in the default (row-major) layout.
#define CHECK_CONTIGUOUS(x)                                                             \
  TORCH_CHECK((x).is_contiguous(), #x " must be contiguous, got shape ", (x).sizes(), \
              " with strides ", (x).strides())

// x must have exactly dtype `dtype` (e.g. at::kHalf, at::kBFloat16, at::kFloat).
#define CHECK_DTYPE(x, dtype)                                                        \
  TORCH_CHECK((x).scalar_type() == (dtype), #x " must have dtype ", (dtype), ", got ", \
              (x).scalar_type())

// x must have `n` dimensions.
#define CHECK_DIM(x, n) \
  TORCH_CHECK((x).dim() == (n), #x " must be ", (n), "-D, got shape ", (x).sizes())

// x and y must be on the same device / have the same dtype.
#define CHECK_SAME_DEVICE(x, y)                                                       \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on the same device, got ", \
              (x).device(), " and ", (y).device())
#define CHECK_SAME_DTYPE(x, y)                                                            \
  TORCH_CHECK((x).scalar_type() == (y).scalar_type(), #x " and " #y                       \
              " must have the same dtype, got ", (x).scalar_type(), " and ", (y).scalar_type())

// The usual pair for kernel inputs.
#define CHECK_INPUT(x) \
  do {                 \
    CHECK_CUDA(x);     \
    CHECK_CONTIGUOUS(x); \
  } while (0)
