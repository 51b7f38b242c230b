// Scale + mask + softmax (+ dropout) over the rows of the attention scores, and its backward.
//
// Semantics (fastbert.reference.scaled_dot_product_attention): logits = S * scale (+ float mask);
// a key is removed by a False bool mask entry, by causality (j > i) or by a -inf logit; a row with
// no key left returns P = 0 (and so zero gradient) instead of NaN.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "attention/attention.h"
#include "device_utils.cuh"

namespace fastbert {
namespace attention {

// Threads per row: a power of two in [32, 256] with about 4 vectors per thread; rows per block so
// that a block has at least 128 threads.
inline int threads_per_row(int64_t vecs) {
  int tpr = 32;
  while (tpr < 256 && static_cast<int64_t>(tpr) * 4 < vecs) tpr *= 2;
  return tpr;
}
inline int rows_per_block(int tpr) { return tpr >= 128 ? 1 : 128 / tpr; }

// Online softmax state of a set of logits: max m and sum l of exp(logit - m); (-inf, 0) = empty.
__device__ __forceinline__ void softmax_add(float& m, float& l, float x) {
  if (x > m) {
    l = l * expf(m - x) + 1.f;  // m = -inf: exp(-inf) = 0
    m = x;
  } else if (x != -INFINITY) {
    l += expf(x - m);  // NaN logits propagate into l
  }
}

// Merges state (m2, l2) into (m, l). Symmetric, so xor-butterflies agree bitwise in every lane:
// each product is rounded on its own (__fmul_rn), because nvcc would contract `a * b + c * d`
// into fma(a, b, c * d), whose rounding depends on which state is `a, b` (the two lanes of a pair
// hold them in swapped order: they disagreed by an ulp in ~7% of merges).
__device__ __forceinline__ void softmax_merge(float& m, float& l, float m2, float l2) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) {
    l = l + l2;  // both 0, or NaN from a NaN logit (kept, so that the row comes out NaN)
  } else {
    l = __fmul_rn(l, expf(m - mx)) + __fmul_rn(l2, expf(m2 - mx));
  }
  m = mx;
}

// Merges the states of the blockDim.x threads of each row (every thread of the block calls it).
__device__ __forceinline__ void row_softmax_merge(float& m, float& l, float* smem_m, float* smem_l) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
    const float l2 = __shfl_xor_sync(0xffffffffu, l, offset);
    softmax_merge(m, l, m2, l2);
  }
  const int warps = static_cast<int>(blockDim.x >> 5);
  if (warps == 1) return;  // block-uniform
  const int base = static_cast<int>(threadIdx.y) * warps;
  if ((threadIdx.x & 31u) == 0) {
    smem_m[base + (threadIdx.x >> 5)] = m;
    smem_l[base + (threadIdx.x >> 5)] = l;
  }
  __syncthreads();
  m = smem_m[base];
  l = smem_l[base];
  for (int w = 1; w < warps; ++w) softmax_merge(m, l, smem_m[base + w], smem_l[base + w]);
  __syncthreads();
}

// Logits of the N scores of row (b, h, i) starting at key `col`, in place.
template <typename T, MaskKind MASK, int N>
__device__ __forceinline__ void to_logits(const SoftmaxFwdParams& p, int64_t mask_row, int64_t i,
                                          int col, float (&v)[N]) {
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const int64_t j = col + k;
    float x = v[k] * p.scale;
    if constexpr (MASK == MaskKind::kBool) {
      if (!static_cast<const bool*>(p.mask)[mask_row + j * p.mask_stride_k]) x = -INFINITY;
    } else if constexpr (MASK == MaskKind::kSameAsInput) {
      x += to_float(static_cast<const T*>(p.mask)[mask_row + j * p.mask_stride_k]);
    } else if constexpr (MASK == MaskKind::kFloat32) {
      x += static_cast<const float*>(p.mask)[mask_row + j * p.mask_stride_k];
    }
    if (x == INFINITY) x = NAN;  // torch: exp(inf - inf) makes the row NaN (not a one-hot on it)
    if (p.causal && j > i) x = -INFINITY;
    v[k] = x;
  }
}

// One row of [B * H * Lq, Lk] per TPR threads: pass 1 folds the row into an online-softmax state
// (max, sum of exp), pass 2 re-reads the scores and writes P (and dropout(P)). Block (TPR, RPB),
// grid ceil(rows / RPB). VEC consecutive keys per thread per step (VEC > 1 needs Lk % VEC == 0).
template <typename T, int VEC, MaskKind MASK>
__global__ void __launch_bounds__(256)
softmax_fwd_kernel(const SoftmaxFwdParams p) {
  __shared__ float smem_m[32], smem_l[32];
  const int64_t rows = p.batch * p.heads * p.q_len;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < rows;
  const int64_t i = row % p.q_len;            // query index
  const int64_t bh = row / p.q_len;
  const int64_t h = bh % p.heads, b = bh / p.heads;
  const int64_t mask_row = b * p.mask_stride_b + h * p.mask_stride_h + i * p.mask_stride_q;
  const int cols = static_cast<int>(p.k_len);
  const int first = static_cast<int>(threadIdx.x) * VEC, step = static_cast<int>(blockDim.x) * VEC;
  const T* scores = static_cast<const T*>(p.scores) + row * p.k_len;

  float m = -INFINITY, l = 0.f;
  for (int col = first; valid && col < cols; col += step) {
    float v[VEC];
    load_vec<T, VEC>(scores + col, v);
    to_logits<T, MASK, VEC>(p, mask_row, i, col, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) softmax_add(m, l, v[k]);
  }
  row_softmax_merge(m, l, smem_m, smem_l);
  if (!valid) return;

  // At least one key takes part (a NaN logit counts: l is then NaN and so is the row, as in torch).
  const bool alive = m != -INFINITY || l != 0.f;
  const float inv_l = alive ? 1.f / l : 0.f;
  const bool dropout = p.dropout.p > 0.f;
  const uint64_t seed = dropout ? load_seed(p.dropout) : 0ull;
  const float inv_keep = dropout ? p.dropout.scale : 1.f;
  T* probs = static_cast<T*>(p.probs) + row * p.k_len;
  T* dropped = dropout ? static_cast<T*>(p.probs_dropped) + row * p.k_len : nullptr;
  for (int col = first; col < cols; col += step) {
    float v[VEC];
    load_vec<T, VEC>(scores + col, v);  // before the store below: probs may alias scores
    to_logits<T, MASK, VEC>(p, mask_row, i, col, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = alive ? expf(v[k] - m) * inv_l : 0.f;
    store_vec<T, VEC>(probs + col, v);
    if (dropout) {
      bool keep[VEC];
      dropout_keep<VEC>(seed, static_cast<uint64_t>(row * p.k_len + col), p.dropout.p, keep);
      // From P as stored, as the backward regenerates it: forward and backward agree bitwise.
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] = keep[k] ? round_to<T>(v[k]) * inv_keep : 0.f;
      store_vec<T, VEC>(dropped + col, v);
    }
  }
}

// dP = dropout'(dPd); dS = P * (dP - sum_j P_j dP_j) * out_scale, written over dPd. Pass 1 forms
// the row dot product, pass 2 writes (same thread, same elements: in place is safe). Block
// (TPR, RPB), grid ceil(rows / RPB).
template <typename T, int VEC>
__global__ void __launch_bounds__(256)
softmax_bwd_kernel(const SoftmaxBwdParams p) {
  __shared__ float smem[32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < p.rows;
  const int cols = static_cast<int>(p.cols);
  const int first = static_cast<int>(threadIdx.x) * VEC, step = static_cast<int>(blockDim.x) * VEC;
  const bool dropout = p.dropout.p > 0.f;
  const uint64_t seed = dropout ? load_seed(p.dropout) : 0ull;
  const float inv_keep = dropout ? p.dropout.scale : 1.f;
  const T* probs = static_cast<const T*>(p.probs) + row * p.cols;
  T* grad = static_cast<T*>(p.grad) + row * p.cols;

  float dot = 0.f;
  for (int col = first; valid && col < cols; col += step) {
    float pr[VEC], g[VEC];
    load_vec<T, VEC>(probs + col, pr);
    load_vec<T, VEC>(grad + col, g);
    if (dropout) {
      bool keep[VEC];
      dropout_keep<VEC>(seed, static_cast<uint64_t>(row * p.cols + col), p.dropout.p, keep);
#pragma unroll
      for (int k = 0; k < VEC; ++k) g[k] = keep[k] ? g[k] * inv_keep : 0.f;
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) dot += pr[k] * g[k];
  }
  dot = row_sum(dot, smem);
  if (!valid) return;
  T* dropped = dropout && p.probs_dropped != nullptr ? static_cast<T*>(p.probs_dropped) + row * p.cols : nullptr;
  for (int col = first; col < cols; col += step) {
    float pr[VEC], g[VEC];
    load_vec<T, VEC>(probs + col, pr);
    load_vec<T, VEC>(grad + col, g);
    if (dropout) {
      bool keep[VEC];
      dropout_keep<VEC>(seed, static_cast<uint64_t>(row * p.cols + col), p.dropout.p, keep);
      float pd[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        g[k] = keep[k] ? g[k] * inv_keep : 0.f;
        pd[k] = keep[k] ? pr[k] * inv_keep : 0.f;
      }
      if (dropped != nullptr) store_vec<T, VEC>(dropped + col, pd);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) g[k] = pr[k] * (g[k] - dot) * p.out_scale;
    store_vec<T, VEC>(grad + col, g);
  }
}

// keep[e] = uniform(seed, e) >= p, the rule of dropout_keep(), four elements per Philox call.
__global__ void __launch_bounds__(256) dropout_mask_kernel(const DropoutMaskParams p) {
  const uint64_t seed = load_seed(p.dropout);
  const int64_t groups = (p.numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const uint4 r = philox4x32_10(seed, static_cast<uint64_t>(g));
#pragma unroll
    for (uint32_t lane = 0; lane < 4; ++lane) {
      const int64_t e = g * 4 + lane;
      if (e < p.numel) p.keep[e] = uint_to_uniform(uint4_lane(r, lane)) >= p.dropout.p;
    }
  }
}

template <typename T, int VEC, MaskKind MASK>
cudaError_t launch_fwd(const SoftmaxFwdParams& p, cudaStream_t stream) {
  const int tpr = threads_per_row(p.k_len / VEC);
  const int rpb = rows_per_block(tpr);
  const int64_t rows = p.batch * p.heads * p.q_len;
  const int64_t blocks = (rows + rpb - 1) / rpb;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  softmax_fwd_kernel<T, VEC, MASK><<<static_cast<unsigned>(blocks), dim3(tpr, rpb), 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t launch_fwd_mask(const SoftmaxFwdParams& p, cudaStream_t stream) {
  switch (p.mask_kind) {
    case MaskKind::kNone: return launch_fwd<T, VEC, MaskKind::kNone>(p, stream);
    case MaskKind::kBool: return launch_fwd<T, VEC, MaskKind::kBool>(p, stream);
    case MaskKind::kSameAsInput: return launch_fwd<T, VEC, MaskKind::kSameAsInput>(p, stream);
    case MaskKind::kFloat32:
      if constexpr (std::is_same<T, float>::value) {
        return launch_fwd<T, VEC, MaskKind::kSameAsInput>(p, stream);  // the same thing for fp32
      } else {
        return launch_fwd<T, VEC, MaskKind::kFloat32>(p, stream);
      }
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_fwd_vec(const SoftmaxFwdParams& p, cudaStream_t stream) {
  constexpr int VEC = vec_width<T>();
  const bool vec = p.k_len % VEC == 0 && is_aligned(p.scores, 16) && is_aligned(p.probs, 16) &&
                   is_aligned(p.probs_dropped, 16);
  return vec ? launch_fwd_mask<T, VEC>(p, stream) : launch_fwd_mask<T, 1>(p, stream);
}

template <typename T>
cudaError_t launch_bwd(const SoftmaxBwdParams& p, cudaStream_t stream) {
  constexpr int VEC = vec_width<T>();
  const bool vec = p.cols % VEC == 0 && is_aligned(p.probs, 16) && is_aligned(p.grad, 16) &&
                   is_aligned(p.probs_dropped, 16);
  const int tpr = threads_per_row(p.cols / (vec ? VEC : 1));
  const int rpb = rows_per_block(tpr);
  const int64_t blocks = (p.rows + rpb - 1) / rpb;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  if (vec) {
    softmax_bwd_kernel<T, VEC><<<static_cast<unsigned>(blocks), dim3(tpr, rpb), 0, stream>>>(p);
  } else {
    softmax_bwd_kernel<T, 1><<<static_cast<unsigned>(blocks), dim3(tpr, rpb), 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace attention

Status softmax_fwd(const SoftmaxFwdParams& params, cudaStream_t stream) {
  if (params.batch * params.heads * params.q_len == 0 || params.k_len == 0) return cudaSuccess;
  if (params.k_len > kMaxRowLength) return cudaErrorInvalidValue;
  if (params.mask_kind != MaskKind::kNone && params.mask == nullptr) return cudaErrorInvalidValue;
  if (params.dropout.p > 0.f && (params.probs_dropped == nullptr || params.dropout.seed == nullptr))
    return cudaErrorInvalidValue;
  return FASTBERT_DISPATCH_DTYPE(params.dtype, [&] {
    return attention::launch_fwd_vec<scalar_t>(params, stream);
  });
}

Status softmax_bwd(const SoftmaxBwdParams& params, cudaStream_t stream) {
  if (params.rows == 0 || params.cols == 0) return cudaSuccess;
  if (params.cols > kMaxRowLength) return cudaErrorInvalidValue;
  if (params.dropout.p > 0.f && params.dropout.seed == nullptr) return cudaErrorInvalidValue;
  return FASTBERT_DISPATCH_DTYPE(params.dtype, [&] {
    return attention::launch_bwd<scalar_t>(params, stream);
  });
}

Status dropout_mask(const DropoutMaskParams& params, int num_sms, cudaStream_t stream) {
  if (params.numel == 0) return cudaSuccess;
  if (params.dropout.seed == nullptr) return cudaErrorInvalidValue;
  constexpr int kThreads = 256;
  const int64_t groups = (params.numel + 3) / 4;
  const int64_t blocks = std::max<int64_t>(
      1, std::min<int64_t>((groups + kThreads - 1) / kThreads, static_cast<int64_t>(std::max(num_sms, 1)) * 8));
  attention::dropout_mask_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace fastbert
