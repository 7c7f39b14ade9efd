// Fused sampling: temperature, top-k, top-p, min-p and the draw, without sorting the vocabulary.
//
// Torch-free (CUDA runtime headers only), so CI can compile it with `nvcc -c` on a machine
// without torch's CUDA headers; csrc/sampling.cu checks the tensors and calls launch_sample().
// The semantics are fastlm/ops/sampling_reference.py's and the algorithm is the Triton
// kernel's (kernels/sampling.py), one thread block per row:
//
//   order:  logits descending, ties by lower index. key(x) = bits(x) for x >= +0, else
//           bits(x) ^ 0x7FFFFFFF: an int32 monotone in x. Every filter keeps a prefix
//           (t, cut) = { key > t } ∪ { key == t and index < cut } of the order.
//   pass 1: max, first argmax, min over finite logits; NaN / +inf / finite counts -> status.
//   top-k:  16-way search for the largest t with cnt(key >= t) >= k (invariant
//           cnt(key >= lo) >= k > cnt(key >= hi)); ties at the boundary are cut by index.
//   top-p:  the same search on masses M(t) = Σ_{kept, key >= t} w, w = exp2((x - max)·log2e/T),
//           for the largest t with M(t) >= P·Z, Z = total top-k mass.
//   draw:   W = Σ kept w (min-p: w >= m), then the first index, in index order, whose running
//           sum of kept w exceeds u·W (block scans over tiles of kThreads·kItems logits).
//
// Reductions use warp shuffles and a fixed-order sum over warps: deterministic, no atomics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace fastlm {
namespace sampling {

// Threads per row (block). Overridable only for tests/ops/cuda_emulation (a CPU emulation of
// the kernel with fewer threads); the extension build always uses 512.
#ifndef FASTLM_SAMPLING_THREADS
#define FASTLM_SAMPLING_THREADS 512
#endif
constexpr int kThreads = FASTLM_SAMPLING_THREADS;
static_assert(kThreads % 32 == 0 && kThreads >= 32 && kThreads <= 1024, "whole warps, at most 1024 threads");
constexpr int kWarps = kThreads / 32;
constexpr int kNumPivots = 16;  // search arity: 4 bits of the 32-bit key per pass
constexpr int kMaxIters = 11;   // ceil(33 / 4) + 2: the search needs at most 9 passes
constexpr int kItems = 8;       // contiguous logits per thread in the ordered (scan) passes
constexpr float kLog2e = 1.4426950408889634f;

// Row status bits (fastlm.ops.sampling_reference.STATUS_*).
constexpr int32_t kStatusNaN = 1;
constexpr int32_t kStatusPosInf = 2;
constexpr int32_t kStatusNoFinite = 4;
constexpr int32_t kStatusBadTemperature = 8;
constexpr int32_t kStatusBadTopK = 16;
constexpr int32_t kStatusBadTopP = 32;
constexpr int32_t kStatusBadMinP = 64;

enum class LogitsType { kFloat32, kFloat16, kBFloat16 };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }

// int32 key monotone in the float value (-inf lowest).
__device__ __forceinline__ int32_t order_key(float x) {
  const int32_t bits = __float_as_int(x);
  return bits < 0 ? (bits ^ 0x7fffffff) : bits;
}

// The float whose key is `key` (inverse of order_key).
__device__ __forceinline__ float key_value(int32_t key) {
  return __int_as_float(key < 0 ? (key ^ 0x7fffffff) : key);
}

// The prefix (t, cut) of the order (logit desc, index asc).
struct Prefix {
  int32_t t;
  int32_t cut;
  __device__ __forceinline__ bool contains(int32_t key, int i) const {
    return key > t || (key == t && i < cut);
  }
};

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a < b ? a : b; }
};
struct OrOp {
  __device__ __forceinline__ int operator()(int a, int b) const { return a | b; }
};

// Shared memory of one block: per-warp partials and broadcast results.
struct Scratch {
  float f[kWarps * kNumPivots];
  long long i[kWarps * kNumPivots];
  int n[kWarps];
  float f_out[kNumPivots];
  long long i_out[kNumPivots];
};

// Every thread gets op over the block's values (warp shuffles, then warps in a fixed order).
template <typename T, typename Op>
__device__ T block_all_reduce(T v, Op op, T* partials) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int warp = threadIdx.x >> 5;
  __syncthreads();  // the previous user of `partials` is done
  if ((threadIdx.x & 31) == 0) partials[warp] = v;
  __syncthreads();
  T result = partials[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) result = op(result, partials[w]);
  return result;
}

__device__ __forceinline__ float block_sum(float v, Scratch& s) { return block_all_reduce(v, SumOp(), s.f); }
__device__ __forceinline__ long long block_sum(long long v, Scratch& s) {
  return block_all_reduce(v, SumOp(), s.i);
}

// Element-wise block sums of a per-thread array of kNumPivots values, broadcast to all threads.
template <typename T>
__device__ void block_sum_array(T (&v)[kNumPivots], T* partials, T* out) {
#pragma unroll
  for (int j = 0; j < kNumPivots; ++j) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v[j] += __shfl_xor_sync(0xffffffffu, v[j], offset);
  }
  const int warp = threadIdx.x >> 5;
  __syncthreads();
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int j = 0; j < kNumPivots; ++j) partials[warp * kNumPivots + j] = v[j];
  }
  __syncthreads();
  if (threadIdx.x < kNumPivots) {
    T sum = partials[threadIdx.x];
    for (int w = 1; w < kWarps; ++w) sum += partials[w * kNumPivots + threadIdx.x];
    out[threadIdx.x] = sum;
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kNumPivots; ++j) v[j] = out[j];
}

// Exclusive prefix sum of one value per thread (thread order); `total` gets the block's sum.
__device__ float block_exclusive_scan(float v, float& total, Scratch& s) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  float inclusive = v;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const float n = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += n;
  }
  float exclusive = __shfl_up_sync(0xffffffffu, inclusive, 1);
  if (lane == 0) exclusive = 0.f;
  __syncthreads();
  if (lane == 31) s.f[warp] = inclusive;
  __syncthreads();
  float before = 0.f;
  float sum = 0.f;
  for (int w = 0; w < kWarps; ++w) {
    if (w == warp) before = sum;
    sum += s.f[w];
  }
  total = sum;
  return before + exclusive;
}

// The weight a token keeps in the draw (0 when filtered).
template <typename scalar_t>
struct KeptWeight {
  const scalar_t* x;
  float x_max, scale, min_p;
  Prefix prefix;
  __device__ __forceinline__ float operator()(int i) const {
    const float v = to_float(x[i]);
    const float w = exp2f((v - x_max) * scale);
    return (v > neg_inf() && prefix.contains(order_key(v), i) && w >= min_p) ? w : 0.f;
  }
};

// 1 for a finite token whose key is `key`.
template <typename scalar_t>
struct TieIndicator {
  const scalar_t* x;
  int32_t key;
  __device__ __forceinline__ float operator()(int i) const {
    const float v = to_float(x[i]);
    return (v > neg_inf() && order_key(v) == key) ? 1.f : 0.f;
  }
};

// The first index, in index order, at which the running sum of value(i) exceeds `target`
// and value(i) > 0; -1 if there is none (rounding: the caller falls back).
template <typename ValueFn>
__device__ int first_crossing(int vocab, float target, const ValueFn& value, Scratch& s) {
  float running = 0.f;
  for (int tile = 0; tile < vocab; tile += kThreads * kItems) {
    const int start = tile + static_cast<int>(threadIdx.x) * kItems;
    float vals[kItems];
    float local = 0.f;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      vals[k] = start + k < vocab ? value(start + k) : 0.f;
      local += vals[k];
    }
    float total;
    const float before = block_exclusive_scan(local, total, s);
    if (running + total > target) {  // the same decision in every thread
      float cumulative = running + before;
      int found = INT_MAX;
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        cumulative += vals[k];
        if (found == INT_MAX && vals[k] > 0.f && cumulative > target) found = start + k;
      }
      found = block_all_reduce(found, MinOp(), s.n);
      if (found != INT_MAX) return found;
    }
    running += total;
  }
  return -1;
}

struct SearchResult {
  long long lo, hi, c_lo, c_hi;
  float m_hi, target;
};

// 16-way search of the threshold key in [lo, hi) over the top-k prefix `kept`:
// counts (kMass = false, top-k, goal = k) keep cnt(key >= lo) >= k > cnt(key >= hi) and stop at
// cnt(key >= lo) == k or hi == lo + 1; masses (kMass = true, top-p, goal = P) keep
// M(lo) >= P·Z > M(hi), Z = M(lo) of the first pass, and stop when [lo, hi) holds one token or
// hi == lo + 1. Pivot j = lo + floor(j·(hi - lo) / 16); only tokens inside [lo, hi) are visited.
template <bool kMass, typename scalar_t>
__device__ SearchResult threshold_search(const scalar_t* x, int vocab, float x_max, float scale, long long lo,
                                         long long hi, long long c_lo, Prefix kept, double goal, bool active,
                                         Scratch& s) {
  SearchResult r{lo, hi, c_lo, 0, 0.f, static_cast<float>(goal)};
  const long long k = static_cast<long long>(goal);
  auto more = [&]() { return r.hi - r.lo > 1 && (kMass ? r.c_lo - r.c_hi > 1 : r.c_lo != k); };
  bool go = active && more();
  for (int it = 0; go && it < kMaxIters; ++it) {
    const long long span = r.hi - r.lo;
    int32_t piv[kNumPivots];
#pragma unroll
    for (int j = 0; j < kNumPivots; ++j) piv[j] = static_cast<int32_t>(r.lo + span * j / kNumPivots);
    const int32_t lo32 = static_cast<int32_t>(r.lo);
    const int32_t hi32 = static_cast<int32_t>(r.hi);
    long long cnt[kNumPivots];
    float mass[kNumPivots];
#pragma unroll
    for (int j = 0; j < kNumPivots; ++j) {
      cnt[j] = 0;
      mass[j] = 0.f;
    }
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
      const float v = to_float(x[i]);
      const int32_t key = order_key(v);
      if (v > neg_inf() && key >= lo32 && key < hi32 && kept.contains(key, i)) {
        const float w = kMass ? exp2f((v - x_max) * scale) : 0.f;
#pragma unroll
        for (int j = 0; j < kNumPivots; ++j) {
          if (key >= piv[j]) {
            cnt[j] += 1;
            if (kMass) mass[j] += w;
          }
        }
      }
    }
    block_sum_array(cnt, s.i, s.i_out);
    if (kMass) block_sum_array(mass, s.f, s.f_out);
    int n_ge = 0;
    if (kMass && it == 0) r.target = static_cast<float>(goal) * mass[0];  // pivot 0 = lowest kept: M(lo) = Z
#pragma unroll
    for (int j = 0; j < kNumPivots; ++j) {
      n_ge += kMass ? (mass[j] + r.m_hi >= r.target) : (cnt[j] + r.c_hi >= k);
    }
    n_ge = n_ge > 1 ? n_ge : 1;  // pivot 0 keeps the invariant from the previous pass
    // Indexed reads from the shared copies (a register array indexed at run time would spill).
    const long long c_lo_new = s.i_out[n_ge - 1] + r.c_hi;
    if (n_ge < kNumPivots) {
      r.hi = r.lo + span * n_ge / kNumPivots;
      r.m_hi = kMass ? s.f_out[n_ge] + r.m_hi : 0.f;
      r.c_hi = s.i_out[n_ge] + r.c_hi;
    }
    r.lo = r.lo + span * (n_ge - 1) / kNumPivots;
    r.c_lo = c_lo_new;
    go = more();
  }
  return r;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    sample_kernel(const scalar_t* __restrict__ logits, int64_t row_stride, int vocab,
                  const double* __restrict__ uniform, const float* __restrict__ temperature,
                  const int64_t* __restrict__ top_k, const float* __restrict__ top_p,
                  const float* __restrict__ min_p, int64_t* __restrict__ tokens, float* __restrict__ logprobs,
                  int32_t* __restrict__ status_out) {
  __shared__ Scratch s;
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * row_stride;

  // ---- pass 1: statistics ------------------------------------------------------------------
  float local_max = neg_inf();
  float local_min = pos_inf();
  int local_arg = INT_MAX;
  int flags = 0;
  long long n_finite = 0;
  for (int i = threadIdx.x; i < vocab; i += kThreads) {
    const float v = to_float(x[i]);
    if (v != v) {
      flags |= kStatusNaN;
    } else if (v == pos_inf()) {
      flags |= kStatusPosInf;
    } else if (v > neg_inf()) {
      ++n_finite;
      if (v > local_max) {  // strict: this thread's first maximum
        local_max = v;
        local_arg = i;
      }
      local_min = fminf(local_min, v);
    }
  }
  const float x_max = block_all_reduce(local_max, MaxOp(), s.f);
  const int argmax = block_all_reduce(local_max == x_max ? local_arg : INT_MAX, MinOp(),
                                      s.n);
  const float x_min = block_all_reduce(local_min, MinOp(), s.f);
  flags = block_all_reduce(flags, OrOp(), s.n);
  n_finite = block_sum(n_finite, s);

  const float t = temperature[row];
  const long long k = top_k[row];
  const float p = top_p[row];
  const float m = min_p[row];
  int32_t status = flags;
  if (n_finite == 0) status |= kStatusNoFinite;
  if (!(t >= 0.f && t < pos_inf())) status |= kStatusBadTemperature;
  if (k < 1) status |= kStatusBadTopK;
  if (!(p > 0.f && p <= 1.f)) status |= kStatusBadTopP;
  if (!(m >= 0.f && m <= 1.f)) status |= kStatusBadMinP;
  const bool valid = status == 0;
  const bool sampled = valid && t > 0.f;
  // w = exp2((x - x_max) * scale); the clamp keeps 0 · scale = 0 for subnormal temperatures.
  const float scale = kLog2e / fmaxf(sampled ? t : 1.f, kLog2e / 3.0e38f);
  const long long key_min = order_key(x_min);
  const long long key_max = order_key(x_max);

  // ---- top-k ---------------------------------------------------------------------------------
  const bool top_k_on = sampled && k < n_finite;
  const Prefix all_finite{static_cast<int32_t>(key_min - 1), 0};
  SearchResult rk = threshold_search<false>(x, vocab, x_max, scale, key_min, key_max + 1, n_finite, all_finite,
                                            static_cast<double>(k), top_k_on, s);
  Prefix prefix_k{static_cast<int32_t>(rk.lo - 1), 0};  // {key >= lo} when exact
  if (top_k_on && rk.c_lo != k) {                         // hi == lo + 1: cut the ties at lo
    prefix_k.t = static_cast<int32_t>(rk.lo);
    const int cut = first_crossing(vocab, static_cast<float>(k - rk.c_hi), TieIndicator<scalar_t>{x, prefix_k.t}, s);
    prefix_k.cut = cut < 0 ? vocab : cut;
  }

  // ---- top-p ---------------------------------------------------------------------------------
  const bool top_p_on = sampled && p < 1.f;
  SearchResult rp = threshold_search<true>(x, vocab, x_max, scale, prefix_k.t, key_max + 1,
                                           top_k_on ? k : n_finite, prefix_k, p, top_p_on, s);
  Prefix prefix_p{static_cast<int32_t>(rp.lo - 1), 0};
  if (top_p_on && rp.c_lo - rp.c_hi > 1) {  // hi == lo + 1: several tokens tie at key lo
    // Keep the first n ties: the smallest n with M(hi) + n·w_tie >= P·Z.
    const float n_ties = static_cast<float>(rp.c_lo - rp.c_hi);
    const float w_tie = exp2f((key_value(static_cast<int32_t>(rp.lo)) - x_max) * scale);
    float need = fminf(ceilf((rp.target - rp.m_hi) / w_tie), n_ties);  // (inf when w_tie == 0)
    need = fmaxf(need, 1.f);
    if (need < n_ties) {
      prefix_p.t = static_cast<int32_t>(rp.lo);
      const int cut = first_crossing(vocab, need, TieIndicator<scalar_t>{x, prefix_p.t}, s);
      prefix_p.cut = cut < 0 ? vocab : cut;
    }
  }
  // The kept prefix is the shorter of the two.
  const bool use_p = prefix_p.t > prefix_k.t || (prefix_p.t == prefix_k.t && prefix_p.cut < prefix_k.cut);
  const Prefix prefix = use_p ? prefix_p : prefix_k;

  // ---- draw ----------------------------------------------------------------------------------
  int token = valid ? argmax : 0;
  float logprob = valid ? 0.f : __int_as_float(0x7fc00000);  // NaN for invalid rows
  if (sampled) {
    const KeptWeight<scalar_t> weight{x, x_max, scale, m, prefix};
    float local_total = 0.f;
    int local_last = -1;
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
      const float w = weight(i);
      local_total += w;
      if (w > 0.f) local_last = i;
    }
    const float total = block_sum(local_total, s);
    const int last_positive = block_all_reduce(local_last, MaxOp(), s.n);
    const double goal = uniform[row] * static_cast<double>(total);
    const int found = first_crossing(vocab, static_cast<float>(goal), weight, s);
    token = found < 0 ? last_positive : found;  // u·W rounded up to W: the last kept token
    logprob = (to_float(x[token]) - x_max) / t - logf(total);
  }
  if (threadIdx.x == 0) {
    tokens[row] = token;
    logprobs[row] = logprob;
    status_out[row] = status;
  }
}

#if defined(__CUDACC__)  // the launcher needs nvcc (the CPU emulation calls sample_kernel itself)
// Launch one block per row on `stream`. Pointers: logits (batch, vocab) with row stride
// `row_stride` (elements) and unit column stride; the (batch,) parameter and output arrays.
// The caller checks devices, dtypes, shapes and cudaGetLastError().
inline void launch_sample(LogitsType type, const void* logits, int64_t row_stride, int64_t batch, int vocab,
                          const double* uniform, const float* temperature, const int64_t* top_k,
                          const float* top_p, const float* min_p, int64_t* tokens, float* logprobs,
                          int32_t* status, cudaStream_t stream) {
  if (batch == 0) return;
  const dim3 grid(static_cast<unsigned>(batch));
  switch (type) {
    case LogitsType::kFloat32:
      sample_kernel<float><<<grid, kThreads, 0, stream>>>(static_cast<const float*>(logits), row_stride, vocab,
                                                          uniform, temperature, top_k, top_p, min_p, tokens,
                                                          logprobs, status);
      break;
    case LogitsType::kFloat16:
      sample_kernel<__half><<<grid, kThreads, 0, stream>>>(static_cast<const __half*>(logits), row_stride, vocab,
                                                           uniform, temperature, top_k, top_p, min_p, tokens,
                                                           logprobs, status);
      break;
    case LogitsType::kBFloat16:
      sample_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(logits),
                                                                  row_stride, vocab, uniform, temperature, top_k,
                                                                  top_p, min_p, tokens, logprobs, status);
      break;
  }
}
#endif  // defined(__CUDACC__)

}  // namespace sampling
}  // namespace fastlm
