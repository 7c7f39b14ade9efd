// Skinny float32 GEMM for the CPU decode step: y (M, N) = x (M, K) · Wᵀ (+ bias), M a few rows
// (the batch), W (N, K) prepacked once into 16-column panels (ceil(N/16), K, 16), zero-padded.
//
// A decode step multiplies a handful of rows by every weight of the model, so the kernel is a
// sweep over W: each pair of panels (32 output columns) is read once, front to back, while up to
// 8 rows accumulate in 16 AVX-512 registers (2 panels × 8 rows; one broadcast of x[r][k] feeds
// both), so the weights stream sequentially and the FMA units stay busy. Rows beyond 8 repeat
// the sweep over the same pair of panels (from L2). Sums run over k in order, in float32.
//
// Built with -mavx512f -mfma and loaded only on CPUs whose ATen capability is AVX512
// (fastlm/decoding/cpu_gemm.py); registered as torch.ops.fastlm_cpu.{pack_weight, skinny_linear}.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>

namespace {

constexpr int64_t kPanel = 16;  // output columns per panel: one zmm register

at::Tensor pack_weight(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "fastlm_cpu::pack_weight: weight must be 2-D (out, in), got ", w.dim(), "-D");
  TORCH_CHECK(w.scalar_type() == at::kFloat, "fastlm_cpu::pack_weight: weight must be float32, got ", w.scalar_type());
  TORCH_CHECK(w.device().is_cpu(), "fastlm_cpu::pack_weight: weight must be on the CPU, got ", w.device());
  const at::Tensor wc = w.contiguous();
  const int64_t n = wc.size(0), k = wc.size(1), panels = (n + kPanel - 1) / kPanel;
  at::Tensor padded = at::zeros({panels * kPanel, k}, wc.options());
  padded.narrow(0, 0, n).copy_(wc);
  // (panels, 16, K) -> (panels, K, 16): column c of panel p at [p][k][c]
  return padded.view({panels, kPanel, k}).transpose(1, 2).contiguous();
}

// rows R (1..8) of x times two adjacent panels (32 columns; `cols` of them real, 17..32)
template <int R>
inline void two_panels(const float* x, int64_t k_len, const float* w0, float* y, int64_t ldy, int64_t cols,
                       const float* bias) {
  __m512 a0[R], a1[R];
  for (int r = 0; r < R; ++r) {
    a0[r] = _mm512_setzero_ps();
    a1[r] = _mm512_setzero_ps();
  }
  const float* w1 = w0 + k_len * kPanel;
  for (int64_t k = 0; k < k_len; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(w0 + (k + 16) * kPanel), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w1 + (k + 16) * kPanel), _MM_HINT_T0);
    const __m512 v0 = _mm512_loadu_ps(w0 + k * kPanel);
    const __m512 v1 = _mm512_loadu_ps(w1 + k * kPanel);
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * k_len + k]);
      a0[r] = _mm512_fmadd_ps(xb, v0, a0[r]);
      a1[r] = _mm512_fmadd_ps(xb, v1, a1[r]);
    }
  }
  const __mmask16 m1 = cols - kPanel >= kPanel ? __mmask16(0xFFFF) : __mmask16((1u << (cols - kPanel)) - 1);
  if (bias != nullptr) {
    const __m512 b0 = _mm512_loadu_ps(bias), b1 = _mm512_maskz_loadu_ps(m1, bias + kPanel);
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm512_add_ps(a0[r], b0);
      a1[r] = _mm512_add_ps(a1[r], b1);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(y + r * ldy, a0[r]);
    _mm512_mask_storeu_ps(y + r * ldy + kPanel, m1, a1[r]);
  }
}

// rows R (1..8) of x times one panel (`cols` real columns, 1..16): the last, odd panel. (One
// template over the panel count for both was measured 2x slower at one row: kept apart.)
template <int R>
inline void one_panel(const float* x, int64_t k_len, const float* w0, float* y, int64_t ldy, int64_t cols,
                      const float* bias) {
  __m512 a0[R];
  for (int r = 0; r < R; ++r) a0[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_len; ++k) {
    const __m512 v0 = _mm512_loadu_ps(w0 + k * kPanel);
    for (int r = 0; r < R; ++r) a0[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * k_len + k]), v0, a0[r]);
  }
  const __mmask16 m0 = cols >= kPanel ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
  if (bias != nullptr) {
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, bias);
    for (int r = 0; r < R; ++r) a0[r] = _mm512_add_ps(a0[r], b0);
  }
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * ldy, m0, a0[r]);
}

#define FASTLM_ROWS_SWITCH(KERNEL, rows, ...)   \
  switch (rows) {                               \
    case 8: KERNEL<8>(__VA_ARGS__); break;      \
    case 7: KERNEL<7>(__VA_ARGS__); break;      \
    case 6: KERNEL<6>(__VA_ARGS__); break;      \
    case 5: KERNEL<5>(__VA_ARGS__); break;      \
    case 4: KERNEL<4>(__VA_ARGS__); break;      \
    case 3: KERNEL<3>(__VA_ARGS__); break;      \
    case 2: KERNEL<2>(__VA_ARGS__); break;      \
    default: KERNEL<1>(__VA_ARGS__); break;     \
  }

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                         const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "fastlm_cpu::skinny_linear: x must be a 2-D float32 CPU tensor (rows, in), got ", x.dim(), "-D ",
              x.scalar_type(), " on ", x.device());
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kFloat && packed.size(2) == kPanel &&
                  packed.is_contiguous() && packed.device().is_cpu(),
              "fastlm_cpu::skinny_linear: packed must be pack_weight's contiguous float32 (panels, in, 16), got ",
              packed.sizes());
  const int64_t m = x.size(0), k_len = x.size(1), panels = packed.size(0);
  TORCH_CHECK(packed.size(1) == k_len, "fastlm_cpu::skinny_linear: x has ", k_len, " columns but the weight ",
              packed.size(1));
  TORCH_CHECK(n > (panels - 1) * kPanel && n <= panels * kPanel, "fastlm_cpu::skinny_linear: n=", n,
              " does not match ", panels, " panels of ", kPanel);
  const float* bias_ptr = nullptr;
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == at::kFloat,
                "fastlm_cpu::skinny_linear: bias must be float32 (", n, "), got ", bias->sizes(), " ",
                bias->scalar_type());
    bias_c = bias->contiguous();
    bias_ptr = bias_c.data_ptr<float>();
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({m, n}, xc.options());
  if (m == 0 || n == 0) return y;
  if (k_len == 0) return bias_ptr ? y.copy_(bias_c.expand({m, n})) : y.zero_();
  const float* xp = xc.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t pairs = (panels + 1) / 2;
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t col = pair * 2 * kPanel, cols = std::min<int64_t>(2 * kPanel, n - col);
      const float* w = wp + pair * 2 * k_len * kPanel;
      const float* b = bias_ptr ? bias_ptr + col : nullptr;
      for (int64_t row = 0; row < m; row += 8) {
        const int64_t rows = std::min<int64_t>(8, m - row);
        const float* xr = xp + row * k_len;
        float* yr = yp + row * n + col;
        if (cols > kPanel) {
          FASTLM_ROWS_SWITCH(two_panels, rows, xr, k_len, w, yr, n, cols, b)
        } else {
          FASTLM_ROWS_SWITCH(one_panel, rows, xr, k_len, w, yr, n, cols, b)
        }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(fastlm_cpu, m) {
  m.def("pack_weight(Tensor weight) -> Tensor");
  m.def("skinny_linear(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlm_cpu, CPU, m) {
  m.impl("pack_weight", &pack_weight);
  m.impl("skinny_linear", &skinny_linear);
}
