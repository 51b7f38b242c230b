// bias + GELU and GEGLU (gelu(a) * g) forward / backward for fp16 / bf16 / fp32, math in fp32.
//
//   exact: gelu(z) = z * Phi(z) = 0.5 z (1 + erf(z / sqrt 2)),  gelu'(z) = Phi(z) + z * phi(z)
//   tanh:  gelu(z) = 0.5 z (1 + t), t = tanh(k (z + c z^3)), k = sqrt(2 / pi), c = 0.044715
//          gelu'(z) = 0.5 (1 + t) + 0.5 z (1 - t^2) k (1 + 3 c z^2)
// with z = x + bias. The backward recomputes z from the saved x (no activation is stored).
// GEGLU: y = gelu(a) * g; da = dy * g * gelu'(a), dg = dy * gelu(a), gelu recomputed from a.
#include <algorithm>

#include "device_utils.cuh"
#include "gelu/gelu.h"

namespace fastbert {
namespace gelu {

constexpr float kSqrt2OverPi = 0.7978845608028654f;   // sqrt(2 / pi)
constexpr float kInvSqrt2 = 0.7071067811865476f;      // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.3989422804014327f;    // 1 / sqrt(2 pi)
constexpr float kCubic = 0.044715f;

// 1 + tanh(u) and 1 - tanh(u)^2, the two terms of the tanh form and its derivative, accurate to a
// few ulp: tanhf would become tanh.approx.f32 under --use_fast_math (relative error about 2^-11),
// and 1 + t near t = -1, or 1 - t^2 near |t| = 1 (z around 5, where the derivative is ~1), lose
// most of their digits when formed from t. With a = |u|, 1 - tanh(a) = 2 / (expm1(2a) + 2) (0 once
// expm1 overflows) and 1 + tanh(a) = 2 - that; tanh is odd, so for u < 0 the two swap. A NaN or
// infinite z still gives torch's NaN where it multiplies a zero term.
__device__ __forceinline__ void tanh_terms(float u, float& one_plus_t, float& one_minus_t2) {
  const float lo = 2.f / (expm1f(2.f * fabsf(u)) + 2.f);  // 1 - tanh(|u|), in [0, 1]
  const float hi = 2.f - lo;                               // 1 + tanh(|u|), in [1, 2]
  one_plus_t = u < 0.f ? lo : hi;
  one_minus_t2 = lo * hi;
}

__device__ __forceinline__ float gelu_value(float z, bool tanh_approx) {
  if (tanh_approx) {
    float one_plus_t, one_minus_t2;
    tanh_terms(kSqrt2OverPi * (z + kCubic * z * z * z), one_plus_t, one_minus_t2);
    return 0.5f * z * one_plus_t;
  }
  return 0.5f * z * (1.f + erff(z * kInvSqrt2));
}

// gelu(z) and gelu'(z) together (one tanh or erf for both).
__device__ __forceinline__ void gelu_value_and_derivative(float z, bool tanh_approx, float& value,
                                                          float& derivative) {
  if (tanh_approx) {
    const float z2 = z * z;
    float one_plus_t, one_minus_t2;
    tanh_terms(kSqrt2OverPi * (z + kCubic * z2 * z), one_plus_t, one_minus_t2);
    value = 0.5f * z * one_plus_t;
    // z bounded to 1e4 in the second term, which is exactly 0 beyond (1 - t^2 underflows): z^2 would
    // reach inf for |z| > 1.9e19 and give 0 * inf = NaN for a finite z; (z - z) keeps the NaN of an
    // infinite z
    const float zb = fminf(fmaxf(z, -1e4f), 1e4f);
    derivative = 0.5f * one_plus_t + 0.5f * zb * one_minus_t2 * kSqrt2OverPi * (1.f + 3.f * kCubic * zb * zb)
                 + (z - z);
    return;
  }
  const float cdf = 0.5f * (1.f + erff(z * kInvSqrt2));
  value = z * cdf;
  derivative = cdf + z * expf(-0.5f * z * z) * kInvSqrt2Pi;
}

__device__ __forceinline__ float gelu_derivative(float z, bool tanh_approx) {
  float value, derivative;
  gelu_value_and_derivative(z, tanh_approx, value, derivative);
  return derivative;
}

// z[0..N) = x + bias for the N elements starting at linear index e (column col).
template <typename T, int N>
__device__ __forceinline__ void load_z(const BiasGeluParams& p, int64_t e, int64_t col, float (&z)[N]) {
  load_vec<T, N>(static_cast<const T*>(p.x) + e, z);
  if (p.bias != nullptr) {
    float b[N];
    load_vec<T, N>(static_cast<const T*>(p.bias) + col, b);
#pragma unroll
    for (int i = 0; i < N; ++i) z[i] += b[i];
  }
}

// Elementwise over all rows * cols elements, VEC per thread per step, grid-stride. Forward
// (BWD = false) writes gelu(z); backward without a bias writes dy * gelu'(z). VEC > 1 requires
// cols % VEC == 0, so a vector never straddles two rows.
template <typename T, int VEC, bool BWD>
__global__ void __launch_bounds__(256)
bias_gelu_flat_kernel(const BiasGeluParams p) {
  const int64_t n_vec = p.rows * p.cols / VEC;
  const int64_t cols_vec = p.cols / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < n_vec; v += stride) {
    const int64_t e = v * VEC;
    const int64_t col = p.bias != nullptr ? (v % cols_vec) * VEC : 0;
    float z[VEC], y[VEC];
    load_z<T, VEC>(p, e, col, z);
    if constexpr (BWD) {
      float dy[VEC];
      load_vec<T, VEC>(static_cast<const T*>(p.grad_out) + e, dy);
#pragma unroll
      for (int i = 0; i < VEC; ++i) y[i] = dy[i] * gelu_derivative(z[i], p.tanh_approx);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) y[i] = gelu_value(z[i], p.tanh_approx);
    }
    store_vec<T, VEC>(static_cast<T*>(p.out) + e, y);
  }
}

// Backward with a bias. Block (TPR, RPB); row slot s = blockIdx.x * RPB + threadIdx.y handles
// rows s, s + slots, ...; for each of its VEC-column chunks a thread walks those rows, writes dL/dx
// and keeps the chunk's column sum in registers, then stores it to partial_bias[s, chunk].
template <typename T, int VEC>
__global__ void __launch_bounds__(256)
bias_gelu_bwd_kernel(const BiasGeluParams p) {
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t slots = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t col = static_cast<int64_t>(threadIdx.x) * VEC; col < p.cols;
       col += static_cast<int64_t>(blockDim.x) * VEC) {
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
    for (int64_t row = slot; row < p.rows; row += slots) {
      const int64_t e = row * p.cols + col;
      float z[VEC], dy[VEC], dx[VEC];
      load_z<T, VEC>(p, e, col, z);
      load_vec<T, VEC>(static_cast<const T*>(p.grad_out) + e, dy);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        dx[i] = dy[i] * gelu_derivative(z[i], p.tanh_approx);
        acc[i] += dx[i];
      }
      store_vec<T, VEC>(static_cast<T*>(p.out) + e, dx);
    }
    store_floats<VEC>(p.partial_bias + slot * p.cols + col, acc);
  }
}

template <typename T>
bool vectorizable(const BiasGeluParams& p) {
  constexpr int VEC = vec_width<T>();
  return p.cols % VEC == 0 && is_aligned(p.x, 16) && is_aligned(p.bias, 16) &&
         is_aligned(p.grad_out, 16) && is_aligned(p.out, 16) && is_aligned(p.partial_bias, 16);
}

// Blocks of kFlatThreads for a grid-stride loop over n_vec vectors: enough to cover them, at most
// 8 per SM.
constexpr int kFlatThreads = 256;

inline unsigned flat_blocks(int64_t n_vec, int num_sms) {
  return static_cast<unsigned>(std::max<int64_t>(
      1, std::min<int64_t>((n_vec + kFlatThreads - 1) / kFlatThreads, static_cast<int64_t>(std::max(num_sms, 1)) * 8)));
}

template <typename T, bool BWD>
cudaError_t launch_flat(const BiasGeluParams& p, int num_sms, cudaStream_t stream) {
  constexpr int VEC = vec_width<T>();
  const bool vec = vectorizable<T>(p);
  const unsigned blocks = flat_blocks(p.rows * p.cols / (vec ? VEC : 1), num_sms);
  if (vec) {
    bias_gelu_flat_kernel<T, VEC, BWD><<<blocks, kFlatThreads, 0, stream>>>(p);
  } else {
    bias_gelu_flat_kernel<T, 1, BWD><<<blocks, kFlatThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

// Backward-with-bias configuration: TPR threads per row (power of two in [32, 256], at most one
// vector each per column step), RPB = 256 / TPR rows per block.
struct BwdConfig {
  int vec, tpr, rpb;
};

template <typename T>
BwdConfig bwd_config(const BiasGeluParams& p) {
  BwdConfig c;
  c.vec = vectorizable<T>(p) ? vec_width<T>() : 1;
  const int64_t vecs = p.cols / c.vec;
  c.tpr = 32;
  while (c.tpr < 256 && c.tpr < vecs) c.tpr *= 2;
  c.rpb = 256 / c.tpr;
  return c;
}

template <typename T>
int slots_for(const BiasGeluParams& p, int num_sms) {
  const BwdConfig c = bwd_config<T>(p);
  int64_t blocks = static_cast<int64_t>(std::max(num_sms, 1)) * 4;
  blocks = std::min<int64_t>(blocks, (p.rows + c.rpb - 1) / c.rpb);
  blocks = std::min<int64_t>(blocks, std::max<int64_t>(1, (int64_t{4} << 20) / (p.cols * c.rpb)));
  blocks = std::max<int64_t>(blocks, 1);
  return static_cast<int>(blocks) * c.rpb;
}

template <typename T>
cudaError_t launch_bwd(const BiasGeluParams& p, int num_sms, cudaStream_t stream) {
  if (p.grad_bias == nullptr) return launch_flat<T, true>(p, num_sms, stream);  // no column sum wanted
  const BwdConfig c = bwd_config<T>(p);
  if (p.slots <= 0 || p.slots % c.rpb != 0 || p.partial_bias == nullptr) return cudaErrorInvalidValue;
  const int blocks = p.slots / c.rpb;
  if (c.vec > 1) {
    bias_gelu_bwd_kernel<T, vec_width<T>()><<<blocks, dim3(c.tpr, c.rpb), 0, stream>>>(p);
  } else {
    bias_gelu_bwd_kernel<T, 1><<<blocks, dim3(c.tpr, c.rpb), 0, stream>>>(p);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return static_cast<cudaError_t>(column_sum(p.partial_bias, p.slots, p.cols, p.grad_bias, p.dtype, stream));
}

// ---------------------------------------------------------------------------------------------
// GEGLU. Flat grid-stride loop over rows * cols / VEC vectors; element (row, col) of a tensor is
// at row * row_stride + col (unit column stride; the halves of a packed [rows, 2 cols] input are
// two such views). VEC > 1 requires cols and every row stride to be multiples of VEC and every
// pointer 16-byte aligned, so a vector never straddles two rows.
// ---------------------------------------------------------------------------------------------
template <typename T, int VEC, bool BWD>
__global__ void __launch_bounds__(256)
geglu_kernel(const GegluParams p) {
  const int64_t cols_vec = p.cols / VEC;
  const int64_t n_vec = p.rows * cols_vec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < n_vec; v += stride) {
    const int64_t row = v / cols_vec;
    const int64_t col = (v - row * cols_vec) * VEC;
    float a[VEC], g[VEC];
    load_vec<T, VEC>(static_cast<const T*>(p.a) + row * p.a_row_stride + col, a);
    load_vec<T, VEC>(static_cast<const T*>(p.g) + row * p.g_row_stride + col, g);
    if constexpr (BWD) {
      float dy[VEC], da[VEC], dg[VEC];
      load_vec<T, VEC>(static_cast<const T*>(p.grad_out) + row * p.cols + col, dy);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        float value, derivative;
        gelu_value_and_derivative(a[i], p.tanh_approx, value, derivative);
        da[i] = dy[i] * g[i] * derivative;
        dg[i] = dy[i] * value;
      }
      store_vec<T, VEC>(static_cast<T*>(p.out) + row * p.out_row_stride + col, da);
      store_vec<T, VEC>(static_cast<T*>(p.grad_gate) + row * p.grad_gate_row_stride + col, dg);
    } else {
      float y[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) y[i] = gelu_value(a[i], p.tanh_approx) * g[i];
      store_vec<T, VEC>(static_cast<T*>(p.out) + row * p.out_row_stride + col, y);
    }
  }
}

template <typename T>
bool geglu_vectorizable(const GegluParams& p, bool bwd) {
  constexpr int VEC = vec_width<T>();
  bool ok = p.cols % VEC == 0 && p.a_row_stride % VEC == 0 && p.g_row_stride % VEC == 0 &&
            p.out_row_stride % VEC == 0 && is_aligned(p.a, 16) && is_aligned(p.g, 16) &&
            is_aligned(p.out, 16);
  if (bwd) ok = ok && p.grad_gate_row_stride % VEC == 0 && is_aligned(p.grad_out, 16) && is_aligned(p.grad_gate, 16);
  return ok;
}

template <typename T, bool BWD>
cudaError_t launch_geglu(const GegluParams& p, int num_sms, cudaStream_t stream) {
  constexpr int VEC = vec_width<T>();
  const bool vec = geglu_vectorizable<T>(p, BWD);
  const unsigned blocks = flat_blocks(p.rows * p.cols / (vec ? VEC : 1), num_sms);
  if (vec) {
    geglu_kernel<T, VEC, BWD><<<blocks, kFlatThreads, 0, stream>>>(p);
  } else {
    geglu_kernel<T, 1, BWD><<<blocks, kFlatThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace gelu

Status bias_gelu_fwd(const BiasGeluParams& params, int num_sms, cudaStream_t stream) {
  if (params.rows == 0 || params.cols == 0) return cudaSuccess;
  return FASTBERT_DISPATCH_DTYPE(params.dtype, [&] {
    return gelu::launch_flat<scalar_t, false>(params, num_sms, stream);
  });
}

int bias_gelu_bwd_slots(const BiasGeluParams& params, int num_sms) {
  if (params.rows == 0 || params.cols == 0) return 0;
  switch (params.dtype) {
    case DType::kFloat16: return gelu::slots_for<__half>(params, num_sms);
    case DType::kBFloat16: return gelu::slots_for<__nv_bfloat16>(params, num_sms);
    case DType::kFloat32: return gelu::slots_for<float>(params, num_sms);
  }
  return 0;
}

Status bias_gelu_bwd(const BiasGeluParams& params, int num_sms, cudaStream_t stream) {
  if (params.rows == 0 || params.cols == 0) return cudaSuccess;
  return FASTBERT_DISPATCH_DTYPE(params.dtype, [&] {
    return gelu::launch_bwd<scalar_t>(params, num_sms, stream);
  });
}

Status geglu_fwd(const GegluParams& params, int num_sms, cudaStream_t stream) {
  if (params.rows == 0 || params.cols == 0) return cudaSuccess;
  return FASTBERT_DISPATCH_DTYPE(params.dtype, [&] {
    return gelu::launch_geglu<scalar_t, false>(params, num_sms, stream);
  });
}

Status geglu_bwd(const GegluParams& params, int num_sms, cudaStream_t stream) {
  if (params.rows == 0 || params.cols == 0) return cudaSuccess;
  if (params.grad_out == nullptr || params.grad_gate == nullptr) return cudaErrorInvalidValue;
  return FASTBERT_DISPATCH_DTYPE(params.dtype, [&] {
    return gelu::launch_geglu<scalar_t, true>(params, num_sms, stream);
  });
}

}  // namespace fastbert
