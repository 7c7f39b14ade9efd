// CPU emulation (see cuda_runtime.h): __nv_bfloat16 as float storage, enough to compile the kernels.
#pragma once
struct __nv_bfloat16 {
  float value;
};
inline float __bfloat162float(__nv_bfloat16 h) { return h.value; }
