// Python bindings of the fastlm CUDA extension (fastlm._C, or fastlm_C when JIT-built).
// Op entry points live in one .cu per op family, declared in ops.h and bound here.
#include <torch/extension.h>

#include <cuda_runtime.h>

#include <string>

#include "common.h"
#include "ops.h"

namespace fastlm {

// CUDA runtime version the extension was compiled against, e.g. "13.0".
std::string compiled_cuda_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
}

// Whether the CUDA runtime sees at least one device.
bool has_cuda() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // reset the (non-sticky) error so later CUDA calls start clean
    return false;
  }
  return count > 0;
}

}  // namespace fastlm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastlm C++/CUDA ops";
  m.def("compiled_cuda_version", &fastlm::compiled_cuda_version,
        "CUDA runtime version the extension was compiled against, e.g. '13.0'");
  m.def("has_cuda", &fastlm::has_cuda, "Whether the CUDA runtime sees at least one device");
  m.def("sample", &fastlm::sample, "Fused temperature/top-k/top-p/min-p sampling (sampling.cu)",
        py::arg("logits"), py::arg("uniform"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
        py::arg("min_p"));
  m.def("quantize_per_token", &fastlm::quantize_per_token, "Per-token int8 quantization (int8.cu)",
        py::arg("x"), py::arg("smooth") = py::none());
  m.def("w8a8_linear", &fastlm::w8a8_linear, "W8A8 linear: int8 GEMM with per-token/per-channel scales (int8.cu)",
        py::arg("x"), py::arg("qweight"), py::arg("w_scales"), py::arg("bias") = py::none(),
        py::arg("smooth") = py::none());
}
