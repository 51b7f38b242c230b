// LayerNorm backward (plain and fused add + bias + dropout + residual) for fp16 / bf16 / fp32.
//
// Per row, with x_hat = (s - mean) * rstd and g = dy * weight:
//   ds = rstd * (g - mean(g) - x_hat * mean(g * x_hat))  (+ dL/ds from a returned s)
//   fused: d_residual = ds, d_input = ds * keep / (1 - p) (in the input's dtype, which may be a
//   16-bit one with everything else fp32: mixed precision)
// Column sums (d_weight = sum dy * x_hat, d_bias = sum dy, d_input_bias = sum d_input) are
// accumulated per row slot in fp32 and reduced in a fixed order by column_sum_kernel: the
// gradients are bitwise reproducible, no atomics.
#include <algorithm>

#include "layer_norm/layer_norm_common.cuh"

namespace fastbert {
namespace layer_norm {

template <typename T, int N>
__device__ __forceinline__ void load_weight(const LayerNormBwdParams& p, int col, float (&w)[N]) {
  if (p.weight != nullptr) {
    load_vec<T, N>(static_cast<const T*>(p.weight) + col, w);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) w[i] = 1.f;
  }
}

// ds for N elements given x_hat, dy and the row constants (plus dL/ds from a returned s); stores
// grad_x, and returns d_input = dropout'(ds) in `di` (stored, as XI, when grad_input is requested;
// it also feeds the input-bias column sum). Without dropout d_input = ds.
template <typename T, typename XI, int N>
__device__ __forceinline__ void store_row_grads(const LayerNormBwdParams& p, int64_t row, int col,
                                                const float (&x_hat)[N], const float (&dy)[N],
                                                float rstd, float mean_g, float mean_gx,
                                                uint64_t seed, float inv_keep, float (&di)[N]) {
  float w[N], ds[N];
  load_weight<T, N>(p, col, w);
#pragma unroll
  for (int i = 0; i < N; ++i) ds[i] = rstd * (dy[i] * w[i] - mean_g - x_hat[i] * mean_gx);
  if (p.grad_sum != nullptr) {
    float gs[N];
    load_vec<T, N>(static_cast<const T*>(p.grad_sum) + row * p.cols + col, gs);
#pragma unroll
    for (int i = 0; i < N; ++i) ds[i] += gs[i];
  }
  store_vec<T, N>(static_cast<T*>(p.grad_x) + row * p.cols + col, ds);
  if (p.dropout.p > 0.f) {
    bool keep[N];
    dropout_keep<N>(seed, static_cast<uint64_t>(row * p.cols + col), p.dropout.p, keep);
#pragma unroll
    for (int i = 0; i < N; ++i) di[i] = keep[i] ? ds[i] * inv_keep : 0.f;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) di[i] = ds[i];
  }
  if (p.grad_input != nullptr) store_vec<XI, N>(static_cast<XI*>(p.grad_input) + row * p.cols + col, di);
}

// Register-resident rows (see FastConfig). Block (TPR, RPB); grid slots / RPB; row slot
// `slot` handles rows slot, slot + slots, ... and keeps its column sums in registers. XI: the
// dtype of grad_input (LayerNormBwdParams::grad_input_dtype).
template <typename T, typename XI, int COLS>
__global__ void __launch_bounds__(128)
layer_norm_bwd_fast_kernel(const LayerNormBwdParams p) {
  using Cfg = FastConfig<T, COLS>;
  constexpr int VEC = Cfg::VEC, ITEMS = Cfg::ITEMS, TPR = Cfg::TPR;
  __shared__ float smem[32];  // row_sum2: 2 floats per warp, 16 warps at most (512 threads)
  const int slot = static_cast<int>(blockIdx.x) * Cfg::RPB + static_cast<int>(threadIdx.y);
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * Cfg::RPB;
  const bool dropout = p.dropout.p > 0.f;
  const uint64_t seed = dropout ? load_seed(p.dropout) : 0ull;
  const float inv_keep = dropout ? p.dropout.scale : 1.f;

  float acc_w[ITEMS][VEC], acc_b[ITEMS][VEC], acc_ib[ITEMS][VEC];  // this slot's column sums
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc_w[it][i] = acc_b[it][i] = acc_ib[it][i] = 0.f;
  }

  // `base` is block-uniform, so every thread of the block runs the same number of iterations and
  // reaches every row_sum (which may __syncthreads).
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * Cfg::RPB; base < p.rows; base += row_step) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < p.rows;
    const float mean = valid ? p.mean[row] : 0.f;
    const float rstd = valid ? p.rstd[row] : 0.f;
    float x_hat[ITEMS][VEC], dy[ITEMS][VEC];
    float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int col = (it * TPR + static_cast<int>(threadIdx.x)) * VEC;
      if (valid) {
        float x[VEC], w[VEC];
        load_vec<T, VEC>(static_cast<const T*>(p.x) + row * p.x_stride + col, x);
        load_vec<T, VEC>(static_cast<const T*>(p.grad_out) + row * p.grad_out_stride + col, dy[it]);
        load_weight<T, VEC>(p, col, w);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          x_hat[it][i] = (x[i] - mean) * rstd;
          const float g = dy[it][i] * w[i];
          sum_g += g;
          sum_gx += g * x_hat[it][i];
        }
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) x_hat[it][i] = dy[it][i] = 0.f;
      }
    }
    row_sum2(sum_g, sum_gx, smem);
    const float mean_g = sum_g * (1.f / COLS);
    const float mean_gx = sum_gx * (1.f / COLS);
    if (!valid) continue;  // uniform across the TPR threads of the row; no sync until the next row_sum
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int col = (it * TPR + static_cast<int>(threadIdx.x)) * VEC;
      float di[VEC];
      store_row_grads<T, XI, VEC>(p, row, col, x_hat[it], dy[it], rstd, mean_g, mean_gx, seed, inv_keep,
                                  di);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        acc_w[it][i] += dy[it][i] * x_hat[it][i];
        acc_b[it][i] += dy[it][i];
        acc_ib[it][i] += di[i];
      }
    }
  }
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = (it * TPR + static_cast<int>(threadIdx.x)) * VEC;
    const int64_t off = static_cast<int64_t>(slot) * COLS + col;
    if (p.partial_weight != nullptr) store_floats<VEC>(p.partial_weight + off, acc_w[it]);
    if (p.partial_bias != nullptr) store_floats<VEC>(p.partial_bias + off, acc_b[it]);
    if (p.partial_input_bias != nullptr) store_floats<VEC>(p.partial_input_bias + off, acc_ib[it]);
  }
}

// Adds v to partial[off .. off + N) (this thread is the only one touching those entries).
template <int N>
__device__ __forceinline__ void accumulate(float* partial, int64_t off, const float (&v)[N]) {
  if (partial == nullptr) return;
  float cur[N];
  load_floats<N>(partial + off, cur);
#pragma unroll
  for (int i = 0; i < N; ++i) cur[i] += v[i];
  store_floats<N>(partial + off, cur);
}

// Any width: two passes over each row (row constants, then gradients); column sums are
// accumulated into this slot's row of the (zero-initialised) partial buffers.
// Block (TPR, RPB); grid slots / RPB.
template <typename T, typename XI, int VEC>
__global__ void __launch_bounds__(512)
layer_norm_bwd_kernel(const LayerNormBwdParams p) {
  __shared__ float smem[32];  // row_sum2: 2 floats per warp, 16 warps at most (512 threads)
  const int rpb = static_cast<int>(blockDim.y);
  const int slot = static_cast<int>(blockIdx.x) * rpb + static_cast<int>(threadIdx.y);
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * rpb;
  const int cols = static_cast<int>(p.cols);
  const int first = static_cast<int>(threadIdx.x) * VEC, step = static_cast<int>(blockDim.x) * VEC;
  const bool dropout = p.dropout.p > 0.f;
  const uint64_t seed = dropout ? load_seed(p.dropout) : 0ull;
  const float inv_keep = dropout ? p.dropout.scale : 1.f;

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rpb; base < p.rows; base += row_step) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < p.rows;
    const float mean = valid ? p.mean[row] : 0.f;
    const float rstd = valid ? p.rstd[row] : 0.f;
    const T* x_row = static_cast<const T*>(p.x) + row * p.x_stride;
    const T* dy_row = static_cast<const T*>(p.grad_out) + row * p.grad_out_stride;
    float sum_g = 0.f, sum_gx = 0.f;
    for (int col = first; valid && col < cols; col += step) {
      float x[VEC], dy[VEC], w[VEC];
      load_vec<T, VEC>(x_row + col, x);
      load_vec<T, VEC>(dy_row + col, dy);
      load_weight<T, VEC>(p, col, w);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float g = dy[i] * w[i];
        sum_g += g;
        sum_gx += g * ((x[i] - mean) * rstd);
      }
    }
    row_sum2(sum_g, sum_gx, smem);
    const float mean_g = sum_g / static_cast<float>(cols);
    const float mean_gx = sum_gx / static_cast<float>(cols);
    if (!valid) continue;
    for (int col = first; col < cols; col += step) {
      float x_hat[VEC], dy[VEC], di[VEC], dw[VEC];
      load_vec<T, VEC>(x_row + col, x_hat);
      load_vec<T, VEC>(dy_row + col, dy);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        x_hat[i] = (x_hat[i] - mean) * rstd;
        dw[i] = dy[i] * x_hat[i];
      }
      store_row_grads<T, XI, VEC>(p, row, col, x_hat, dy, rstd, mean_g, mean_gx, seed, inv_keep, di);
      const int64_t off = static_cast<int64_t>(slot) * cols + col;
      accumulate<VEC>(p.partial_weight, off, dw);
      accumulate<VEC>(p.partial_bias, off, dy);
      accumulate<VEC>(p.partial_input_bias, off, di);
    }
  }
}

// Launch configuration of the backward kernel: threads per row, rows per block, fast path?
struct BwdConfig {
  bool fast = false;
  int vec = 1, tpr = 32, rpb = 1;
};

template <typename T>
BwdConfig bwd_config(const LayerNormBwdParams& p) {
  constexpr int VEC = vec_width<T>();
  constexpr int BYTES = 16;
  BwdConfig c;
  const bool vectorizable =
      p.cols % VEC == 0 && p.x_stride % VEC == 0 && p.grad_out_stride % VEC == 0 &&
      is_aligned(p.x, BYTES) && is_aligned(p.grad_out, BYTES) && is_aligned(p.grad_sum, BYTES) &&
      is_aligned(p.weight, BYTES) && is_aligned(p.grad_x, BYTES) && is_aligned(p.grad_input, BYTES) &&
      is_aligned(p.partial_weight, BYTES) && is_aligned(p.partial_bias, BYTES) &&
      is_aligned(p.partial_input_bias, BYTES);
  c.vec = vectorizable ? VEC : 1;
  if (vectorizable && is_fast_width(p.cols)) {
    c.fast = true;
    c.tpr = p.cols / VEC >= 512 ? 128 : 32;  // FastConfig<T, cols>::TPR
    c.rpb = 128 / c.tpr;
  } else {
    c.tpr = generic_threads_per_row(p.cols / c.vec);
    c.rpb = generic_rows_per_block(c.tpr);
  }
  return c;
}

template <typename T>
int slots_for(const LayerNormBwdParams& p, int num_sms) {
  const BwdConfig c = bwd_config<T>(p);
  const int threads = c.tpr * c.rpb;
  // Enough blocks to fill the GPU at a few blocks per SM (the register-resident fast kernels use
  // ~240 registers per thread at 128 threads: 2 resident blocks per SM), and at most ~16 MiB per
  // partial buffer.
  const int per_sm = c.fast ? 2 : (threads >= 512 ? 1 : 512 / threads);
  int64_t blocks = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * per_sm;
  blocks = std::min<int64_t>(blocks, (p.rows + c.rpb - 1) / c.rpb);
  blocks = std::min<int64_t>(blocks, std::max<int64_t>(1, (int64_t{4} << 20) / (p.cols * c.rpb)));
  blocks = std::max<int64_t>(blocks, 1);
  return static_cast<int>(blocks) * c.rpb;
}

template <typename T, typename XI, int COLS>
void launch_fast(const LayerNormBwdParams& p, int blocks, cudaStream_t stream) {
  using Cfg = FastConfig<T, COLS>;
  layer_norm_bwd_fast_kernel<T, XI, COLS><<<blocks, dim3(Cfg::TPR, Cfg::RPB), 0, stream>>>(p);
}

template <typename T, typename XI>
cudaError_t launch(const LayerNormBwdParams& p, cudaStream_t stream) {
  const BwdConfig c = bwd_config<T>(p);
  if (p.slots <= 0 || p.slots % c.rpb != 0) return cudaErrorInvalidValue;
  const int blocks = p.slots / c.rpb;
  if (c.fast) {
    switch (p.cols) {
      case 768: launch_fast<T, XI, 768>(p, blocks, stream); break;
      case 1024: launch_fast<T, XI, 1024>(p, blocks, stream); break;
      case 4096: launch_fast<T, XI, 4096>(p, blocks, stream); break;
      default: return cudaErrorInvalidValue;
    }
  } else if (c.vec > 1) {
    layer_norm_bwd_kernel<T, XI, vec_width<T>()><<<blocks, dim3(c.tpr, c.rpb), 0, stream>>>(p);
  } else {
    layer_norm_bwd_kernel<T, XI, 1><<<blocks, dim3(c.tpr, c.rpb), 0, stream>>>(p);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const float* partials[3] = {p.partial_weight, p.partial_bias, p.partial_input_bias};
  void* outs[3] = {p.grad_weight, p.grad_bias, p.grad_input_bias};
  for (int i = 0; i < 3; ++i) {
    if (partials[i] == nullptr || outs[i] == nullptr) continue;
    err = static_cast<cudaError_t>(column_sum(partials[i], p.slots, p.cols, outs[i], p.dtype, stream));
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace layer_norm

int layer_norm_bwd_slots(const LayerNormBwdParams& params, int num_sms) {
  if (params.rows == 0 || params.cols == 0) return 0;
  switch (params.dtype) {
    case DType::kFloat16: return layer_norm::slots_for<__half>(params, num_sms);
    case DType::kBFloat16: return layer_norm::slots_for<__nv_bfloat16>(params, num_sms);
    case DType::kFloat32: return layer_norm::slots_for<float>(params, num_sms);
  }
  return 0;
}

Status layer_norm_bwd(const LayerNormBwdParams& params, cudaStream_t stream) {
  if (params.rows == 0 || params.cols == 0) return cudaSuccess;
  if (params.cols > kMaxRowLength) return cudaErrorInvalidValue;
  if (params.grad_input == nullptr || params.grad_input_dtype == params.dtype) {
    return FASTBERT_DISPATCH_DTYPE(params.dtype, [&] {
      return layer_norm::launch<scalar_t, scalar_t>(params, stream);
    });
  }
  // mixed precision (see LayerNormFwdParams::x_dtype): a 16-bit input's gradient, fp32 otherwise
  if (params.dtype != DType::kFloat32) return cudaErrorInvalidValue;
  switch (params.grad_input_dtype) {
    case DType::kFloat16: return layer_norm::launch<float, __half>(params, stream);
    case DType::kBFloat16: return layer_norm::launch<float, __nv_bfloat16>(params, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastbert
