// Pieces shared by the LayerNorm forward and backward kernel files: launch configurations and the
// fused "s = dropout(x + input_bias) + residual" load.
#pragma once

#include "device_utils.cuh"
#include "layer_norm/layer_norm.h"

namespace fastbert {
namespace layer_norm {

// Register-resident fast path for the BERT widths: a row of COLS elements is held in registers by
// TPR threads, ITEMS 128-bit vectors each, so it is read from memory once. 768 and 1024 take one
// warp per row (4 rows per 128-thread block, reductions are pure shuffles); 4096 takes a
// 128-thread block per row. Every other width, or unaligned tensors, take the generic kernels.
template <typename T, int COLS>
struct FastConfig {
  static constexpr int VEC = vec_width<T>();     // elements per 128-bit access
  static constexpr int VECS = COLS / VEC;        // vectors per row
  static constexpr int TPR = VECS >= 512 ? 128 : 32;  // threads per row
  static constexpr int ITEMS = VECS / TPR;       // vectors per thread
  static constexpr int RPB = 128 / TPR;          // rows per 128-thread block
  static_assert(COLS % VEC == 0 && VECS % TPR == 0, "fast-path width must tile exactly");
};

inline bool is_fast_width(int64_t cols) { return cols == 768 || cols == 1024 || cols == 4096; }

// Generic kernels: TPR threads per row (a power of two in [32, 512], about 4 vectors per thread
// per pass), RPB rows per block so that a block has at least 128 threads.
inline int generic_threads_per_row(int64_t vecs) {
  int tpr = 32;
  while (tpr < 512 && static_cast<int64_t>(tpr) * 4 < vecs) tpr *= 2;
  return tpr;
}
inline int generic_rows_per_block(int tpr) { return tpr >= 128 ? 1 : 128 / tpr; }

// s[0..N) = dropout(x + input_bias) + residual for the N elements at (row, col), in fp32; x is
// read as X (T, or a 16-bit input with an fp32 T: mixed precision), everything else as T.
template <typename T, typename X, int N>
__device__ __forceinline__ void load_pre_norm_sum(const LayerNormFwdParams& p, int64_t row, int col,
                                                  uint64_t seed, float inv_keep, float (&s)[N]) {
  load_vec<X, N>(static_cast<const X*>(p.x) + row * p.x_stride + col, s);
  if (p.input_bias != nullptr) {
    float b[N];
    load_vec<T, N>(static_cast<const T*>(p.input_bias) + col, b);
#pragma unroll
    for (int i = 0; i < N; ++i) s[i] += b[i];
  }
  if (p.dropout.p > 0.f) {
    bool keep[N];
    dropout_keep<N>(seed, static_cast<uint64_t>(row * p.cols + col), p.dropout.p, keep);
#pragma unroll
    for (int i = 0; i < N; ++i) s[i] = keep[i] ? s[i] * inv_keep : 0.f;
  }
  if (p.residual != nullptr) {
    float r[N];
    load_vec<T, N>(static_cast<const T*>(p.residual) + row * p.residual_stride + col, r);
#pragma unroll
    for (int i = 0; i < N; ++i) s[i] += r[i];
  }
  if (p.sum != nullptr) {
    // The fused op stores s in T and its backward recomputes x_hat from that stored s; normalising
    // the same rounded s keeps forward and backward consistent (and every path identical).
#pragma unroll
    for (int i = 0; i < N; ++i) s[i] = round_to<T>(s[i]);
  }
}

}  // namespace layer_norm
}  // namespace fastbert
