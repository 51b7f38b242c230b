// Definitions shared by the binding (fastbert.cpp) and the kernel files (*.cu).
//
// Deliberately free of torch headers: the .cu files include only this, the CUDA headers and their
// family's params header, so nvcc compiles them in seconds instead of a minute each. The binding
// checks every input, fills a plain params struct and calls a launcher declared in a family header;
// launchers return the status (cudaError_t as an int) of their launches, which the binding turns
// into a TORCH_CHECK.
//
// The binding is compiled by the host compiler without any CUDA header: torch may locate a
// toolkit (CUDA_HOME) whose headers the host compile cannot use, and all the binding needs is the
// stream type. CUDA runtime queries go through the helpers below (common.cu).
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef __CUDACC__
#include <cuda_runtime_api.h>
#else
struct CUstream_st;
using cudaStream_t = CUstream_st*;  // the same type as the CUDA runtime's typedef
#endif

namespace fastbert {

// Longest row (elements) the row kernels take: they walk a row with an `int` column counter that
// steps by up to 4096, which must not overflow past the row's end.
constexpr int64_t kMaxRowLength = (int64_t{1} << 31) - 8192;

// A launcher's result: the cudaError_t of its launches as an int; 0 (cudaSuccess) = launched.
using Status = int;
constexpr Status kSuccess = 0;

// cudaGetErrorString for a Status.
const char* status_string(Status status);
// Number of SMs of `device` (cudaDevAttrMultiProcessorCount); 0 and *status set on error.
int device_sm_count(int device, Status* status);
// Largest dynamic shared memory a block may opt into on `device` (bytes).
size_t device_max_smem_per_block(int device, Status* status);
// Major compute capability of `device` (cudaDevAttrComputeCapabilityMajor); 0 and *status on error.
int device_cc_major(int device, Status* status);

// Element type of a kernel's floating-point tensors; the binding maps at::ScalarType onto it.
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// Dropout RNG state: a device pointer to one int64 seed (drawn on the device by torch's default
// generator of that device, so neither drawing nor reading it syncs the host, and a captured CUDA
// graph draws a fresh one on each replay) plus the drop probability.
// Element e of a dropout-able tensor (its linear index in the logical contiguous layout) is kept
// iff uniform(seed, e) >= p, see philox.cuh; the same rule regenerates the mask in backward and
// materialises it for tests (dropout_mask).
struct DropoutParams {
  float p = 0.f;                  // drop probability in [0, 1); 0 disables dropout
  float scale = 1.f;              // 1 / (1 - p), computed in double from the caller's p (not from
                                  // the fp32 p: 1 - 0.99f is off by 1e-6 relative)
  const int64_t* seed = nullptr;  // [1] on the device; read only when p > 0
};

// out[c] = sum over s of partial[s, c] for a [slots, cols] fp32 buffer, summed in a fixed order
// (deterministic, no atomics); out is [cols] of `dtype`. Second stage of every bias / weight
// gradient (common.cu).
Status column_sum(const float* partial, int slots, int64_t cols, void* out, DType dtype,
                  cudaStream_t stream);

}  // namespace fastbert

// Compile-time switch over a DType (in .cu files): expands BODY (a lambda taking no arguments)
// with `scalar_t` bound to __half, __nv_bfloat16 or float and returns what it returns (a
// cudaError_t).
#define FASTBERT_DISPATCH_DTYPE(DTYPE, ...)                                \
  [&]() -> cudaError_t {                                                   \
    switch (DTYPE) {                                                       \
      case ::fastbert::DType::kFloat16: {                                  \
        using scalar_t = __half;                                           \
        return __VA_ARGS__();                                              \
      }                                                                    \
      case ::fastbert::DType::kBFloat16: {                                 \
        using scalar_t = __nv_bfloat16;                                    \
        return __VA_ARGS__();                                              \
      }                                                                    \
      case ::fastbert::DType::kFloat32: {                                  \
        using scalar_t = float;                                            \
        return __VA_ARGS__();                                              \
      }                                                                    \
    }                                                                      \
    return cudaErrorInvalidValue;                                          \
  }()
