// LayerNorm forward (plain and fused add + bias + dropout + residual) for fp16 / bf16 / fp32.
// Statistics in fp32 by the corrected two-pass algorithm (Chan, Golub & LeVeque 1983): pass 1
// gives a mean m0; pass 2 sums d = s - m0 and d^2, so mean = m0 + c with c = mean(d), and
// var = mean(d^2) - c^2 (c is tiny: no E[x^2] - E[x]^2 cancellation). Outputs use (s - m0) - c,
// never s - mean with a rounded mean, which loses ~ulp(mean) when the row sits near a large
// common offset.
#include "layer_norm/layer_norm_common.cuh"

namespace fastbert {
namespace layer_norm {

// mean(d^2) - c^2, at least 0. A NaN (a NaN or inf input) stays NaN, as in torch; a sum of
// squares that overflowed stays inf (rstd 0: the row gives the bias, as in the Triton kernels),
// where inf - inf = NaN clamped by fmaxf would give rstd = 1 / sqrt(eps) and outputs of ~1e33.
__device__ __forceinline__ float corrected_variance(float mean_sq, float shift) {
  if (mean_sq == INFINITY) return mean_sq;
  const float var = mean_sq - shift * shift;
  return var < 0.f ? 0.f : var;
}

// One row per TPR threads, held in registers. Block (TPR, RPB); grid ceil(rows / RPB). T: every
// tensor's dtype but x's, X (see LayerNormFwdParams::x_dtype).
template <typename T, typename X, int COLS>
__global__ void __launch_bounds__(128, 4)
layer_norm_fwd_fast_kernel(const LayerNormFwdParams p) {
  using Cfg = FastConfig<T, COLS>;
  constexpr int VEC = Cfg::VEC, ITEMS = Cfg::ITEMS, TPR = Cfg::TPR;
  __shared__ float smem[32];  // row_sum2: 2 floats per warp, 16 warps at most (512 threads)
  const int64_t row = static_cast<int64_t>(blockIdx.x) * Cfg::RPB + threadIdx.y;
  const bool valid = row < p.rows;
  const bool dropout = p.dropout.p > 0.f;
  const uint64_t seed = dropout ? load_seed(p.dropout) : 0ull;
  const float inv_keep = dropout ? p.dropout.scale : 1.f;

  float s[ITEMS][VEC];  // [ITEMS, VEC] slice of the row owned by this thread
  float local = 0.f;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = (it * TPR + static_cast<int>(threadIdx.x)) * VEC;
    if (valid) {
      load_pre_norm_sum<T, X, VEC>(p, row, col, seed, inv_keep, s[it]);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) s[it][i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) local += s[it][i];
  }
  const float mean0 = row_sum(local, smem) * (1.f / COLS);
  float local_d = 0.f;
  local = 0.f;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float d = s[it][i] - mean0;
      local_d += d;
      local += d * d;
    }
  }
  row_sum2(local_d, local, smem);
  const float shift = local_d * (1.f / COLS);
  const float var = corrected_variance(local * (1.f / COLS), shift);
  const float rstd = rsqrtf(var + p.eps);
  if (!valid) return;  // no block-wide synchronisation below
  if (threadIdx.x == 0) {
    p.mean[row] = mean0 + shift;
    p.rstd[row] = rstd;
  }
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = (it * TPR + static_cast<int>(threadIdx.x)) * VEC;
    if (p.sum != nullptr) store_vec<T, VEC>(static_cast<T*>(p.sum) + row * COLS + col, s[it]);
    float w[VEC], b[VEC], y[VEC];
    if (p.weight != nullptr) {
      load_vec<T, VEC>(static_cast<const T*>(p.weight) + col, w);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) w[i] = 1.f;
    }
    if (p.bias != nullptr) {
      load_vec<T, VEC>(static_cast<const T*>(p.bias) + col, b);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) b[i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) y[i] = ((s[it][i] - mean0) - shift) * rstd * w[i] + b[i];
    store_vec<T, VEC>(static_cast<T*>(p.out) + row * COLS + col, y);
  }
}

// Any width: TPR threads per row loop over the row three times (sum, squared deviations,
// normalise); the re-reads hit L1/L2. The fused op stores s in pass 1 and re-reads it, so the
// RNG and the additions run once per element. Block (TPR, RPB); grid ceil(rows / RPB).
template <typename T, typename X, int VEC>
__global__ void __launch_bounds__(512)
layer_norm_fwd_kernel(const LayerNormFwdParams p) {
  __shared__ float smem[32];  // row_sum2: 2 floats per warp, 16 warps at most (512 threads)
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < p.rows;
  const int cols = static_cast<int>(p.cols);
  const int first = static_cast<int>(threadIdx.x) * VEC, step = static_cast<int>(blockDim.x) * VEC;
  const bool dropout = p.dropout.p > 0.f;
  const uint64_t seed = dropout ? load_seed(p.dropout) : 0ull;
  const float inv_keep = dropout ? p.dropout.scale : 1.f;
  T* sum_row = p.sum != nullptr ? static_cast<T*>(p.sum) + row * p.cols : nullptr;
  const X* x_row = static_cast<const X*>(p.x) + row * p.x_stride;
  // Pass 2 and 3 re-read s: from the stored sum (fused) or from x (plain: s = x, X = T).
  const auto load_s = [&](int col, float (&s)[VEC]) {
    if (sum_row != nullptr) {
      load_vec<T, VEC>(sum_row + col, s);
    } else {
      load_vec<X, VEC>(x_row + col, s);
    }
  };

  float local = 0.f;
  for (int col = first; valid && col < cols; col += step) {
    float s[VEC];
    load_pre_norm_sum<T, X, VEC>(p, row, col, seed, inv_keep, s);
    if (sum_row != nullptr) store_vec<T, VEC>(sum_row + col, s);
#pragma unroll
    for (int i = 0; i < VEC; ++i) local += s[i];
  }
  const float mean0 = row_sum(local, smem) / static_cast<float>(cols);
  float local_d = 0.f;
  local = 0.f;
  for (int col = first; valid && col < cols; col += step) {
    float s[VEC];
    load_s(col, s);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float d = s[i] - mean0;
      local_d += d;
      local += d * d;
    }
  }
  row_sum2(local_d, local, smem);
  const float shift = local_d / static_cast<float>(cols);
  const float var = corrected_variance(local / static_cast<float>(cols), shift);
  const float rstd = rsqrtf(var + p.eps);
  if (!valid) return;
  if (threadIdx.x == 0) {
    p.mean[row] = mean0 + shift;
    p.rstd[row] = rstd;
  }
  for (int col = first; col < cols; col += step) {
    float s[VEC], w[VEC], b[VEC], y[VEC];
    load_s(col, s);
    if (p.weight != nullptr) {
      load_vec<T, VEC>(static_cast<const T*>(p.weight) + col, w);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) w[i] = 1.f;
    }
    if (p.bias != nullptr) {
      load_vec<T, VEC>(static_cast<const T*>(p.bias) + col, b);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) b[i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) y[i] = ((s[i] - mean0) - shift) * rstd * w[i] + b[i];
    store_vec<T, VEC>(static_cast<T*>(p.out) + row * p.cols + col, y);
  }
}

template <typename T, typename X, int COLS>
cudaError_t launch_fast(const LayerNormFwdParams& p, cudaStream_t stream) {
  using Cfg = FastConfig<T, COLS>;
  const int64_t blocks = (p.rows + Cfg::RPB - 1) / Cfg::RPB;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  layer_norm_fwd_fast_kernel<T, X, COLS>
      <<<static_cast<unsigned>(blocks), dim3(Cfg::TPR, Cfg::RPB), 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename X, int VEC>
cudaError_t launch_generic(const LayerNormFwdParams& p, cudaStream_t stream) {
  const int tpr = generic_threads_per_row(p.cols / VEC);
  const int rpb = generic_rows_per_block(tpr);
  const int64_t blocks = (p.rows + rpb - 1) / rpb;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  layer_norm_fwd_kernel<T, X, VEC><<<static_cast<unsigned>(blocks), dim3(tpr, rpb), 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename X>
cudaError_t launch(const LayerNormFwdParams& p, cudaStream_t stream) {
  constexpr int VEC = vec_width<T>();
  constexpr int BYTES = 16;
  const bool vectorizable =
      p.cols % VEC == 0 && p.x_stride % VEC == 0 &&
      (p.residual == nullptr || p.residual_stride % VEC == 0) &&
      is_aligned(p.x, static_cast<int>(VEC * sizeof(X))) &&
      is_aligned(p.residual, BYTES) && is_aligned(p.input_bias, BYTES) &&
      is_aligned(p.weight, BYTES) && is_aligned(p.bias, BYTES) && is_aligned(p.out, BYTES) &&
      is_aligned(p.sum, BYTES);
  if (!vectorizable) return launch_generic<T, X, 1>(p, stream);
  switch (p.cols) {
    case 768: return launch_fast<T, X, 768>(p, stream);
    case 1024: return launch_fast<T, X, 1024>(p, stream);
    case 4096: return launch_fast<T, X, 4096>(p, stream);
    default: return launch_generic<T, X, VEC>(p, stream);
  }
}

}  // namespace layer_norm

Status layer_norm_fwd(const LayerNormFwdParams& params, cudaStream_t stream) {
  if (params.rows == 0 || params.cols == 0) return cudaSuccess;
  if (params.cols > kMaxRowLength) return cudaErrorInvalidValue;
  if (params.x_dtype == params.dtype) {
    return FASTBERT_DISPATCH_DTYPE(params.dtype, [&] {
      return layer_norm::launch<scalar_t, scalar_t>(params, stream);
    });
  }
  // mixed precision: the fused op only (plain LayerNorm re-reads x as its sum), fp32 otherwise
  if (params.dtype != DType::kFloat32 || params.sum == nullptr) return cudaErrorInvalidValue;
  switch (params.x_dtype) {
    case DType::kFloat16: return layer_norm::launch<float, __half>(params, stream);
    case DType::kBFloat16: return layer_norm::launch<float, __nv_bfloat16>(params, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastbert
