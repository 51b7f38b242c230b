// nvcuda::wmma for the CUDA emulator (tests/cuda_emu/cuda_emu.h): found before the toolkit's mma.h
// when the kernels are compiled as C++. WMMA is defined on whole 16x16x16 tiles; each emulated
// thread of a warp holds the whole tile, loads all of it and computes the whole product (the
// per-lane layout of fragments is unspecified by CUDA and the kernels never index it), but stores
// only its share. Products
// are of the stored (fp16 / bf16) values, summed in fp32 as the tensor cores do.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

inline float emu_to_float(float x) { return x; }
inline float emu_to_float(__half x) { return __half2float(x); }
inline float emu_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int kRows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int kCols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = kRows * kCols;
  T x[kRows * kCols];  // row-major logical tile
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, T value) {
  for (auto& e : f.x) e = value;
}

// An operand tile from memory with leading dimension ldm (in elements).
template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* ptr, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::kRows; ++r)
    for (int c = 0; c < F::kCols; ++c)
      f.x[r * F::kCols + c] = std::is_same<Layout, col_major>::value ? ptr[c * ldm + r] : ptr[r * ldm + c];
}

// Each lane stores only its share of the tile, as on a GPU, where a lane that reads what another
// lane stored needs a __syncwarp between: element (r, c) belongs to lane (r % 8) * 4 + (c % 8) / 2,
// the accumulator layout of the mma.sync m16n8k16 instructions that WMMA compiles to.
int emu_lane();

template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* ptr, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  const int lane = emu_lane();
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) {
      if ((r % 8) * 4 + (c % 8) / 2 != lane) continue;
      if (layout == mem_row_major) {
        ptr[r * ldm + c] = f.x[r * N + c];
      } else {
        ptr[c * ldm + r] = f.x[r * N + c];
      }
    }
}

template <int M, int N, int K, typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = c.x[i * N + j];
      for (int k = 0; k < K; ++k) acc += emu_to_float(a.x[i * K + k]) * emu_to_float(b.x[k * N + j]);
      out[i * N + j] = acc;
    }
  for (int e = 0; e < M * N; ++e) d.x[e] = out[e];
}

}  // namespace wmma
}  // namespace nvcuda
