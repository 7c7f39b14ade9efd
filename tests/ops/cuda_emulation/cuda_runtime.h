// CPU emulation of the CUDA features the torch-free kernels in csrc/ use, for tests on machines
// without a GPU: this directory goes first on the include path, so it stands in for the
// toolkit's <cuda_runtime.h> when a kernel header is compiled by a host C++ compiler.
//
// One thread block runs at a time; each CUDA thread is a ucontext fiber of one OS thread, and
// every __syncthreads() and warp shuffle is a barrier of the whole block (the fibers run round
// robin until all reach it; reaching different numbers of barriers is reported as divergence).
// Shuffles therefore must be called by every thread of the block, as in the kernels tested.
// __shared__ variables are function statics: one instance shared by the block's threads.
#pragma once

#include <math.h>  // ceilf, exp2f, fmaxf, fminf, logf as in device code
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
using cudaStream_t = void*;

namespace cuda_emulation {

struct Block {
  int threads = 0;
  int current = 0;
  ucontext_t scheduler;
  std::vector<ucontext_t> contexts;
  std::vector<std::vector<char>> stacks;
  std::vector<long> barriers;  // barriers reached, per thread
  std::vector<bool> finished;
  std::vector<uint64_t> slots;  // shuffle exchange, one word per thread
  std::function<void()> body;
};

inline Block& block() {
  static Block b;
  return b;
}

inline uint3& thread_index() {
  static uint3 t;
  return t;
}

inline uint3& block_index() {
  static uint3 b;
  return b;
}

inline void yield_to_scheduler() {
  Block& b = block();
  ++b.barriers[b.current];
  swapcontext(&b.contexts[b.current], &b.scheduler);
}

inline void fiber_entry() {
  Block& b = block();
  b.body();
  b.finished[b.current] = true;  // then uc_link returns to the scheduler
}

// Run `body` as one block of `threads` CUDA threads with blockIdx.x = block_x.
inline void run_block(unsigned block_x, int threads, std::function<void()> body) {
  Block& b = block();
  b.threads = threads;
  b.body = std::move(body);
  b.contexts.assign(threads, ucontext_t{});
  b.stacks.assign(threads, std::vector<char>(1 << 18));
  b.barriers.assign(threads, 0);
  b.finished.assign(threads, false);
  b.slots.assign(threads, 0);
  block_index().x = block_x;
  for (int t = 0; t < threads; ++t) {
    getcontext(&b.contexts[t]);
    b.contexts[t].uc_stack.ss_sp = b.stacks[t].data();
    b.contexts[t].uc_stack.ss_size = b.stacks[t].size();
    b.contexts[t].uc_link = &b.scheduler;
    makecontext(&b.contexts[t], fiber_entry, 0);
  }
  for (;;) {
    int alive = 0;
    for (int t = 0; t < threads; ++t) {
      if (b.finished[t]) continue;
      b.current = t;
      thread_index().x = static_cast<unsigned>(t);
      swapcontext(&b.scheduler, &b.contexts[t]);
      alive += b.finished[t] ? 0 : 1;
    }
    if (alive == 0) break;
    long reached = -1;
    for (int t = 0; t < threads; ++t) {
      if (b.finished[t] || (reached >= 0 && b.barriers[t] == reached)) continue;
      if (reached >= 0 || alive != threads) {
        std::fprintf(stderr, "cuda_emulation: divergent barrier (thread %d at %ld, others at %ld, %d of %d alive)\n",
                     t, b.barriers[t], reached, alive, threads);
        std::abort();
      }
      reached = b.barriers[t];
    }
  }
}

template <typename T>
T exchange(T v, int source) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of at most 8 bytes");
  Block& b = block();
  uint64_t word = 0;
  std::memcpy(&word, &v, sizeof(T));
  b.slots[b.current] = word;
  yield_to_scheduler();  // every thread has written its value
  T out;
  std::memcpy(&out, &b.slots[source], sizeof(T));
  yield_to_scheduler();  // every thread has read before the slots are reused
  return out;
}

}  // namespace cuda_emulation

#define threadIdx (::cuda_emulation::thread_index())
#define blockIdx (::cuda_emulation::block_index())

inline void __syncthreads() { cuda_emulation::yield_to_scheduler(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  const int t = cuda_emulation::block().current;
  return cuda_emulation::exchange(v, (t & ~31) | ((t & 31) ^ lane_mask));
}

template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned delta) {
  const int t = cuda_emulation::block().current;
  const int lane = t & 31;
  return cuda_emulation::exchange(v, lane >= static_cast<int>(delta) ? t - static_cast<int>(delta) : t);
}

inline float __int_as_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
inline float __int_as_float(uint32_t i) { return __int_as_float(static_cast<int32_t>(i)); }
inline int32_t __float_as_int(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}
