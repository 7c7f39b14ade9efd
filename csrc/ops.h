// Declarations of the op entry points defined in the csrc/*.cu files (one file per op
// family), bound to Python in bindings.cpp. Each entry point checks its inputs (common.h),
// sets the device guard and launches on the current stream.
#pragma once

#include <ATen/ATen.h>

namespace fastlm {

// e.g. (issue 5):  at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

}  // namespace fastlm
