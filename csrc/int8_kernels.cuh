// Pure-CUDA kernels of the W8A8 linear (no torch headers: checked alone with `nvcc -c`).
//
// Dynamic per-token quantization, with optional SmoothQuant factors c (K,):
//   sx[m]    = max_k |x[m, k] / c[k]| / 127            (1 for an all-zero row)
//   xq[m, k] = round_half_even(x[m, k] / c[k] / sx[m])  clamped to [-127, 127]
// Dequantizing epilogue of the int32 GEMM acc = xq · qweightᵀ:
//   y[m, n]  = acc[m, n] · sx[m] · sw[n] + bias[n]
//
// Divisions are IEEE round-to-nearest (__fdiv_rn) and rounding is half-to-even
// (__float2int_rn), so xq and sx match torch's `round(x / c / (amax / 127))` bit for bit.
// The quantized buffer may be padded (rows_padded ≥ rows, cols_padded ≥ cols, as cuBLASLt's int8
// GEMM needs M > 16 and K % 8 == 0): padding is written as zeros (scale 1).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fastlm {
namespace int8 {

constexpr int kQuantThreads = 256;
constexpr int kDequantThreads = 256;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Max over the block (blockDim.x == THREADS, a multiple of 32); every thread gets the result.
template <int THREADS>
__device__ __forceinline__ float block_max(float v) {
  __shared__ float warp_max[THREADS / 32];
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  v = lane < THREADS / 32 ? warp_max[lane] : 0.0f;
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// One block per (padded) row: pass 1 finds max|x/c|, pass 2 writes xq (and zeros in the padding).
template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS) quantize_per_token_kernel(
    const T* __restrict__ x, int64_t ldx, const float* __restrict__ smooth, int8_t* __restrict__ q,
    int64_t ldq, float* __restrict__ scales, int64_t rows, int64_t cols, int64_t cols_padded) {
  const int64_t row = blockIdx.x;
  int8_t* q_row = q + row * ldq;
  if (row >= rows) {  // padding row
    for (int64_t k = threadIdx.x; k < cols_padded; k += THREADS) q_row[k] = 0;
    if (threadIdx.x == 0) scales[row] = 1.0f;
    return;
  }
  const T* x_row = x + row * ldx;
  float amax = 0.0f;
  for (int64_t k = threadIdx.x; k < cols; k += THREADS) {
    float v = to_float(x_row[k]);
    if (smooth != nullptr) v = __fdiv_rn(v, smooth[k]);
    amax = fmaxf(amax, fabsf(v));
  }
  amax = block_max<THREADS>(amax);
  const float scale = amax > 0.0f ? __fdiv_rn(amax, 127.0f) : 1.0f;
  for (int64_t k = threadIdx.x; k < cols_padded; k += THREADS) {
    int8_t value = 0;
    if (k < cols) {
      float v = to_float(x_row[k]);
      if (smooth != nullptr) v = __fdiv_rn(v, smooth[k]);
      const int r = __float2int_rn(__fdiv_rn(v, scale));
      value = static_cast<int8_t>(max(-127, min(127, r)));
    }
    q_row[k] = value;
  }
  if (threadIdx.x == 0) scales[row] = scale;
}

// y[m, n] = acc[m, n] · sx[m] · sw[n] (+ bias[n]) for m < rows, n < cols (grid-stride loop).
template <typename T>
__global__ void __launch_bounds__(kDequantThreads) dequantize_kernel(
    const int32_t* __restrict__ acc, int64_t ld_acc, const float* __restrict__ x_scales,
    const float* __restrict__ w_scales, const T* __restrict__ bias, T* __restrict__ y, int64_t ldy,
    int64_t rows, int64_t cols) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / cols, n = i % cols;
    float v = static_cast<float>(acc[m * ld_acc + n]) * x_scales[m] * w_scales[n];
    if (bias != nullptr) v += to_float(bias[n]);
    y[m * ldy + n] = from_float<T>(v);
  }
}

// Host launchers: enqueue on `stream`; the caller checks the launch (cudaGetLastError).
template <typename T>
inline void launch_quantize_per_token(const T* x, int64_t ldx, const float* smooth, int8_t* q, int64_t ldq,
                                      float* scales, int64_t rows, int64_t rows_padded, int64_t cols,
                                      int64_t cols_padded, cudaStream_t stream) {
  if (rows_padded == 0) return;
  quantize_per_token_kernel<T, kQuantThreads><<<static_cast<unsigned>(rows_padded), kQuantThreads, 0, stream>>>(
      x, ldx, smooth, q, ldq, scales, rows, cols, cols_padded);
}

template <typename T>
inline void launch_dequantize(const int32_t* acc, int64_t ld_acc, const float* x_scales, const float* w_scales,
                              const T* bias, T* y, int64_t ldy, int64_t rows, int64_t cols, int num_sms,
                              cudaStream_t stream) {
  const int64_t total = rows * cols;
  if (total == 0) return;
  const int64_t wanted = (total + kDequantThreads - 1) / kDequantThreads;
  const int64_t cap = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * 8;
  const unsigned blocks = static_cast<unsigned>(wanted < cap ? wanted : cap);
  dequantize_kernel<T><<<blocks, kDequantThreads, 0, stream>>>(acc, ld_acc, x_scales, w_scales, bias, y, ldy,
                                                                rows, cols);
}

}  // namespace int8
}  // namespace fastlm
