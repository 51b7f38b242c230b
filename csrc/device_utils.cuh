// Device helpers shared by every kernel: element conversions, 128-bit vector loads and stores,
// warp / row reductions and the Philox counter-based RNG behind dropout.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common.h"

namespace fastbert {

// ---------------------------------------------------------------------------------------------
// Element conversions (all arithmetic is done in fp32)
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Rounds an fp32 value to T and back (what storing it in a T tensor does to it).
template <typename T>
__device__ __forceinline__ float round_to(float x) { return to_float(from_float<T>(x)); }

// Elements per 128-bit access.
template <typename T>
constexpr int vec_width() { return static_cast<int>(16 / sizeof(T)); }

// ---------------------------------------------------------------------------------------------
// Vector loads / stores of N consecutive elements, converted to / from fp32. The address must be
// aligned to N * sizeof(T) bytes (N = vec_width<T>() gives one 128-bit access); the launchers
// check alignment on the host and fall back to N = 1 when it does not hold.
// ---------------------------------------------------------------------------------------------
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* ptr, float (&out)[N]) {
  const Vec<T, N> tmp = *reinterpret_cast<const Vec<T, N>*>(ptr);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(tmp.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* ptr, const float (&in)[N]) {
  Vec<T, N> tmp;
#pragma unroll
  for (int i = 0; i < N; ++i) tmp.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Vec<T, N>*>(ptr) = tmp;
}

// fp32 stores of N values to an address aligned to min(16, 4 * N) bytes.
template <int N>
__device__ __forceinline__ void store_floats(float* ptr, const float (&in)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4)
      *reinterpret_cast<float4*>(ptr + i) = make_float4(in[i], in[i + 1], in[i + 2], in[i + 3]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) ptr[i] = in[i];
  }
}

template <int N>
__device__ __forceinline__ void load_floats(const float* ptr, float (&out)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const float4 t = *reinterpret_cast<const float4*>(ptr + i);
      out[i] = t.x;
      out[i + 1] = t.y;
      out[i + 2] = t.z;
      out[i + 3] = t.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = ptr[i];
  }
}

// True when `ptr` may be accessed with `bytes`-wide vectors.
__host__ __device__ inline bool is_aligned(const void* ptr, int bytes) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

// ---------------------------------------------------------------------------------------------
// Reductions. xor-butterflies leave the bitwise-identical result in every lane (fp32 + and max
// are commutative), so every thread of a row sees the same statistics.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the blockDim.x threads of a row (blockDim.x a multiple of 32, blockDim.y rows per
// block). Every thread of the block must call it (it may __syncthreads). `smem` holds at least
// blockDim.x * blockDim.y / 32 floats. The cross-warp sum runs in a fixed order: deterministic.
__device__ __forceinline__ float row_sum(float v, float* smem) {
  v = warp_sum(v);
  const int warps = static_cast<int>(blockDim.x >> 5);
  if (warps == 1) return v;  // block-uniform branch
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int warp = static_cast<int>(threadIdx.x >> 5);
  float* row_smem = smem + threadIdx.y * warps;
  if (lane == 0) row_smem[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < warps; ++w) total += row_smem[w];
  __syncthreads();  // smem may be reused by the next reduction
  return total;
}

// Two sums over the threads of a row at once (row_sum's rules): one round of shared memory and
// barriers for both. `smem` holds at least 2 * blockDim.x * blockDim.y / 32 floats.
__device__ __forceinline__ void row_sum2(float& a, float& b, float* smem) {
  a = warp_sum(a);
  b = warp_sum(b);
  const int warps = static_cast<int>(blockDim.x >> 5);
  if (warps == 1) return;  // block-uniform branch
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int warp = static_cast<int>(threadIdx.x >> 5);
  float* row_smem = smem + threadIdx.y * warps * 2;
  if (lane == 0) {
    row_smem[2 * warp] = a;
    row_smem[2 * warp + 1] = b;
  }
  __syncthreads();
  float ta = 0.f, tb = 0.f;
  for (int w = 0; w < warps; ++w) {
    ta += row_smem[2 * w];
    tb += row_smem[2 * w + 1];
  }
  __syncthreads();  // smem may be reused by the next reduction
  a = ta;
  b = tb;
}

// ---------------------------------------------------------------------------------------------
// Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a
// counter-based generator, so any element's random number is computed directly from
// (seed, element index) in forward, backward and the test helper alike.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint4 philox4x32_10(uint64_t seed, uint64_t counter) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0u, c3 = 0u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t lo0 = 0xD2511F53u * c0, hi0 = __umulhi(0xD2511F53u, c0);
    const uint32_t lo1 = 0xCD9E8D57u * c2, hi1 = __umulhi(0xCD9E8D57u, c2);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return make_uint4(c0, c1, c2, c3);
}

// Uniform in [0, 1) with 24 random bits.
__device__ __forceinline__ float uint_to_uniform(uint32_t x) {
  return static_cast<float>(x >> 8) * (1.0f / 16777216.0f);
}

__device__ __forceinline__ uint32_t uint4_lane(const uint4& r, uint32_t lane) {
  return lane == 0 ? r.x : lane == 1 ? r.y : lane == 2 ? r.z : r.w;
}

// Keep flags of the N consecutive elements e0 .. e0 + N - 1: element e draws lane e % 4 of
// philox(seed, e / 4) and is kept iff its uniform >= p. One Philox call per 4 elements.
template <int N>
__device__ __forceinline__ void dropout_keep(uint64_t seed, uint64_t e0, float p, bool (&keep)[N]) {
  uint64_t group = e0 >> 2;
  uint4 r = philox4x32_10(seed, group);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const uint64_t e = e0 + static_cast<uint64_t>(i);
    if ((e >> 2) != group) {
      group = e >> 2;
      r = philox4x32_10(seed, group);
    }
    keep[i] = uint_to_uniform(uint4_lane(r, static_cast<uint32_t>(e & 3u))) >= p;
  }
}

__device__ __forceinline__ uint64_t load_seed(const DropoutParams& d) {
  return static_cast<uint64_t>(*d.seed);
}

}  // namespace fastbert
