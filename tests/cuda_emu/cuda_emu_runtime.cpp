// The CUDA runtime calls the launchers of csrc/ make, answered by the emulator (tests/cuda_emu/
// cuda_emu.h) as an H100 would; the emulated library needs no libcudart
// (cuda_emu.h renames the calls to these).
#include "cuda_emu.h"
#include "mma.h"

namespace emu {

cudaError_t get_last_error() {
  const cudaError_t e = last_error();
  last_error() = cudaSuccess;
  return e;
}

const char* get_error_string(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error (emulated)";
    case cudaErrorInvalidValue: return "invalid argument (emulated)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated)";
    default: return "unknown error (emulated)";
  }
}

cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || static_cast<size_t>(value) > kMaxSmemOptin) return cudaErrorInvalidValue;
  smem_optin()[func] = static_cast<size_t>(value);
  return cudaSuccess;
}

cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device) {
  if (device < 0 && device != -1) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = kSmCount; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(kMaxSmemOptin); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace emu

int nvcuda::wmma::emu_lane() { return ::emu::lane_id(); }
