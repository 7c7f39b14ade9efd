// CPU emulation (see cuda_runtime.h): __half as float storage, enough to compile the kernels.
#pragma once
struct __half {
  float value;
};
inline float __half2float(__half h) { return h.value; }
