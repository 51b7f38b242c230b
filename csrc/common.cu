// Shared by the kernel families: the second stage of the deterministic bias / weight gradients
// (the per-slot fp32 partial sums the backward kernels write, reduced over the slots in a fixed
// order), and the CUDA runtime queries the binding needs (it includes no CUDA header itself).
#include "device_utils.cuh"

namespace fastbert {
namespace {

// Sums partial[:, c] over the slots in a fixed order. Block (32, 16); grid ceil(cols / 32).
template <typename T>
__global__ void __launch_bounds__(512)
column_sum_kernel(const float* __restrict__ partial, int slots, int64_t cols, T* __restrict__ out) {
  __shared__ float smem[16][33];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  // Compensated (Kahan) summation: each thread adds up to thousands of slots, and a plain fp32
  // running sum would lose a few ulp more than torch's own (pairwise) reductions.
  float acc = 0.f, comp = 0.f;
  if (col < cols) {
    for (int s = static_cast<int>(threadIdx.y); s < slots; s += 16) {
      const float y = partial[s * cols + col] - comp;
      const float t = acc + y;
      comp = (t - acc) - y;
      acc = t;
    }
  }
  smem[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float total = 0.f;
#pragma unroll
    for (int y = 0; y < 16; ++y) total += smem[y][threadIdx.x];
    out[col] = from_float<T>(total);
  }
}

}  // namespace

Status column_sum(const float* partial, int slots, int64_t cols, void* out, DType dtype,
                  cudaStream_t stream) {
  if (cols == 0) return kSuccess;
  const int64_t blocks = (cols + 31) / 32;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return FASTBERT_DISPATCH_DTYPE(dtype, [&] {
    column_sum_kernel<scalar_t><<<static_cast<unsigned>(blocks), dim3(32, 16), 0, stream>>>(
        partial, slots, cols, static_cast<scalar_t*>(out));
    return cudaGetLastError();
  });
}

const char* status_string(Status status) { return cudaGetErrorString(static_cast<cudaError_t>(status)); }

int device_sm_count(int device, Status* status) {
  int n = 0;
  *status = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
  return n;
}

size_t device_max_smem_per_block(int device, Status* status) {
  int n = 0;
  *status = cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return static_cast<size_t>(n);
}

int device_cc_major(int device, Status* status) {
  int n = 0;
  *status = cudaDeviceGetAttribute(&n, cudaDevAttrComputeCapabilityMajor, device);
  return n;
}

}  // namespace fastbert
