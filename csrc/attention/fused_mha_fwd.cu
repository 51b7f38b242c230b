// Fused multi-head attention forward on tensor cores (WMMA m16n16k16, fp32 accumulation).
//
// Block = 4 warps = one 64-query tile of one (batch, head); warp w owns query rows 16w .. 16w + 15.
// Shared memory:
//   q_s  [64, D + 8]      T     the query tile (rows past Lq zero); later each warp's 16 rows serve
//                               as its fp32 staging area for the output
//   kv_s [64, D + 8]      T     one 64-key chunk of K, then of V (rows past Lk zero)
//   s_s  [64, Lk_pad + 4] fp32  scores S = Q K^T of the tile, overwritten row by row with the
//                               probabilities P in T (a row of P takes the first half of its S row)
// Phases (Lk_pad = Lk rounded up to 64, at most 512; variable length: the block's sequence's Lk,
// the rows sized for the longest):
//   1. for each K chunk: S[:, chunk] = Q K_chunk^T    # [16, D] @ [D, 64] -> [16, 64] per warp
//   2. per row (one warp, 16 logits per lane at most): logits = S * scale (+ a float mask), keys
//      a bool mask excludes -> -inf, exact softmax in fp32 (max, exp, sum), fully masked row -> 0;
//      written back as P in T
//   3. for each V chunk: O += P[:, chunk] V_chunk     # [16, 64] @ [64, D] -> [16, D] per warp,
//      O kept in WMMA accumulator fragments across chunks (P is final, so no rescaling)
//   4. O -> fp32 staging (per 16x16 fragment) -> T -> global
// The padding (+8 halves per T row, +4 floats per S row) staggers rows across shared-memory banks;
// every WMMA pointer is 32-byte aligned and every ldm a multiple of 16 bytes, as WMMA requires.
#include <mma.h>

#include <cmath>
#include <mutex>

#include "attention/attention.h"
#include "device_utils.cuh"

namespace fastbert {
namespace fused_mha {

using namespace nvcuda;

constexpr int kBM = 64;       // query rows per block
constexpr int kBN = 64;       // keys per K / V chunk
constexpr int kWarps = kBM / 16;
constexpr int kThreads = kWarps * 32;

template <int D>
struct Layout {
  static constexpr int LDT = D + 8;  // T elements per q_s / kv_s row
  static size_t bytes(int lk_pad) {
    return static_cast<size_t>(2) * kBM * LDT * 2 + static_cast<size_t>(kBM) * (lk_pad + 4) * sizeof(float);
  }
};

__host__ __device__ inline int padded_keys(int64_t k_len) { return static_cast<int>((k_len + kBN - 1) / kBN * kBN); }

// Copies rows row0 .. row0 + 63 of a [n_rows, D] matrix (row stride `stride` elements, 16-byte
// aligned rows) into dst [64, D + 8], zero-filling rows past n_rows. 16 bytes per thread per step.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t stride, int64_t row0, int64_t n_rows) {
  constexpr int kChunks = D * static_cast<int>(sizeof(T)) / 16;  // 16-byte chunks per row
  constexpr int kPerChunk = 16 / static_cast<int>(sizeof(T));
  for (int idx = static_cast<int>(threadIdx.x); idx < kBN * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);  // all-zero bits = +0.0 in fp16 and bf16
    if (row0 + r < n_rows) val = *reinterpret_cast<const uint4*>(src + (row0 + r) * stride + c * kPerChunk);
    *reinterpret_cast<uint4*>(dst + r * Layout<D>::LDT + c * kPerChunk) = val;
  }
}

template <typename T, int D, MaskKind MASK>
__global__ void __launch_bounds__(kThreads)
fused_mha_fwd_kernel(const FusedMhaFwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int LDT = Layout<D>::LDT;
  constexpr int kMaxPerLane = kFusedMhaMaxKeys / 32;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);                  // [kBM, LDT]
  T* kv_s = q_s + kBM * LDT;                                 // [kBN, LDT]

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kBM;
  // This block's sequence: rows q_start .. q_start + q_len - 1 of q (and out), k_start .. of k / v.
  int64_t q_start = 0, k_start = 0, q_len = p.q_len, k_len = p.k_len;
  bool too_long = false;  // a sequence longer than max_seqlen: its output rows are written as NaN
  if (p.cu_seqlens_q != nullptr) {
    q_start = p.cu_seqlens_q[b];
    q_len = p.cu_seqlens_q[b + 1] - q_start;
    k_start = p.cu_seqlens_k[b];
    k_len = p.cu_seqlens_k[b + 1] - k_start;
    // max_seqlen sizes the grid and the shared memory; the host checks it against the offsets in
    // eager mode only (not under torch.compile or CUDA-graph capture). Understated, it must not
    // make this block overrun shared memory: the keys are clamped and the result is poisoned.
    if (k_len > p.k_len || q_len > p.q_len) {
      too_long = true;
      k_len = k_len < p.k_len ? k_len : p.k_len;
    }
    if (q0 >= q_len) return;  // a tile past this sequence's queries: the whole block leaves at once
  }
  const int lk_pad = padded_keys(k_len);  // <= the shared memory's, sized for p.k_len
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h + q_start * p.q_stride_l;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride_b + h * p.k_stride_h + k_start * p.k_stride_l;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride_b + h * p.v_stride_h + k_start * p.v_stride_l;
  const int lds = padded_keys(p.k_len) + 4;  // floats per s_s row
  float* s_s = reinterpret_cast<float*>(kv_s + kBN * LDT);  // [kBM, lds]
  T* q_warp = q_s + warp * 16 * LDT;
  float* s_warp = s_s + warp * 16 * lds;
  const int n_chunks = lk_pad / kBN;

  load_tile<T, D>(q_s, q, p.q_stride_l, q0, q_len);

  // Phase 1: S = Q K^T.
  for (int chunk = 0; chunk < n_chunks; ++chunk) {
    __syncthreads();  // the previous chunk is consumed (and q_s is visible on the first pass)
    load_tile<T, D>(kv_s, k, p.k_stride_l, static_cast<int64_t>(chunk) * kBN, k_len);
    __syncthreads();
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kBN / 16];
#pragma unroll
    for (int n = 0; n < kBN / 16; ++n) wmma::fill_fragment(acc[n], 0.f);
#pragma unroll
    for (int k0 = 0; k0 < D; k0 += 16) {
      // a(m, kk) = Q[16w + m, k0 + kk]
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, q_warp + k0, LDT);
#pragma unroll
      for (int n = 0; n < kBN / 16; ++n) {
        // b(kk, nn) = K[chunk * 64 + 16n + nn, k0 + kk]: K^T read column-major from K's rows
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bk;
        wmma::load_matrix_sync(bk, kv_s + n * 16 * LDT + k0, LDT);
        wmma::mma_sync(acc[n], a, bk, acc[n]);
      }
    }
#pragma unroll
    for (int n = 0; n < kBN / 16; ++n)
      wmma::store_matrix_sync(s_warp + chunk * kBN + n * 16, acc[n], lds, wmma::mem_row_major);
  }
  __syncwarp();  // this warp's S rows (written by this warp only) are visible to all its lanes

  // Phase 2: softmax of each of the warp's 16 rows, P written over the row's S.
  const int per_lane = lk_pad / 32;
  for (int m = 0; m < 16; ++m) {
    const int64_t i = q0 + warp * 16 + m;  // query index; rows past Lq are computed, never stored
    const bool row_valid = i < q_len;
    float* s_row = s_warp + m * lds;
    float x[kMaxPerLane];
    float mx = -INFINITY;
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) {
      x[t] = -INFINITY;
      if (t < per_lane) {
        const int64_t j = t * 32 + lane;
        float val = -INFINITY;
        if (j < k_len) {
          val = s_row[j] * p.scale;
          if constexpr (MASK != MaskKind::kNone) {
            if (row_valid) {
              const int64_t at = b * p.mask_stride_b + h * p.mask_stride_h + i * p.mask_stride_q +
                                 j * p.mask_stride_k;
              if constexpr (MASK == MaskKind::kBool) {
                if (!static_cast<const bool*>(p.mask)[at]) val = -INFINITY;
              } else if constexpr (MASK == MaskKind::kSameAsInput) {
                val += to_float(static_cast<const T*>(p.mask)[at]);  // added to the scaled scores
              } else {
                val += static_cast<const float*>(p.mask)[at];
              }
            }
          }
          if (p.causal && j > i) val = -INFINITY;
        }
        x[t] = val;
        mx = fmaxf(mx, val);
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, offset));
    const bool alive = mx != -INFINITY;
    float sum = 0.f;
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) {
      if (t < per_lane) {
        // exp(-inf) = 0 for masked and padded keys. fmaxf skips NaN, so a row whose only live
        // logits are NaN has mx = -inf: its NaN are kept and make the row NaN, as in torch.
        x[t] = alive ? expf(x[t] - mx) : (x[t] != x[t] ? x[t] : 0.f);
        sum += x[t];
      }
    }
    sum = warp_sum(sum);
    const float inv = alive ? 1.f / sum : 0.f;
    __syncwarp();  // every lane has read its S values of this row before P overwrites them
    T* p_row = reinterpret_cast<T*>(s_row);
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) {
      if (t < per_lane) p_row[t * 32 + lane] = from_float<T>(x[t] * inv);
    }
  }
  __syncwarp();

  // Phase 3: O = P V, accumulated over the V chunks in fragments.
  const T* p_warp = reinterpret_cast<const T*>(s_warp);
  const int ldp = 2 * lds;  // T elements per P row (same byte pitch as S)
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> o[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(o[n], 0.f);
  for (int chunk = 0; chunk < n_chunks; ++chunk) {
    __syncthreads();  // every warp is done with kv_s (K in phase 1, or the previous V chunk)
    load_tile<T, D>(kv_s, v, p.v_stride_l, static_cast<int64_t>(chunk) * kBN, k_len);
    __syncthreads();
#pragma unroll
    for (int k0 = 0; k0 < kBN; k0 += 16) {
      // a(m, kk) = P[16w + m, chunk * 64 + k0 + kk]
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, p_warp + chunk * kBN + k0, ldp);
#pragma unroll
      for (int n = 0; n < D / 16; ++n) {
        // b(kk, nn) = V[chunk * 64 + k0 + kk, 16n + nn]
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bv;
        wmma::load_matrix_sync(bv, kv_s + k0 * LDT + n * 16, LDT);
        wmma::mma_sync(o[n], a, bv, o[n]);
      }
    }
  }

  // Phase 4: O -> global via this warp's (no longer needed) query rows as fp32 staging. Without key
  // chunks (a variable-length sequence with no keys) no barrier above separates load_tile's writes,
  // which fill every warp's rows, from the staging.
  if (n_chunks == 0) __syncthreads();
  float* stage = reinterpret_cast<float*>(q_warp);  // [16, 16] fp32 (q_warp holds 16 * LDT T >= 1 KiB)
  T* out = static_cast<T*>(p.out) + b * p.out_stride_b + h * p.out_stride_h + q_start * p.out_stride_l;
  const int r = lane / 2, c = (lane % 2) * 8;  // each lane writes 8 consecutive outputs of one row
  const int64_t i = q0 + warp * 16 + r;
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    wmma::store_matrix_sync(stage, o[n], 16, wmma::mem_row_major);
    __syncwarp();
    if (i < q_len) {
      float vals[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) vals[e] = too_long ? NAN : stage[r * 16 + c + e];
      store_vec<T, 8>(out + i * p.out_stride_l + n * 16 + c, vals);
    }
    __syncwarp();  // the staging area is read before the next fragment overwrites it
  }
#else
  __trap();  // built for an architecture without bf16 WMMA; the binding never launches it there
#endif
}

template <typename T, int D, MaskKind MASK>
cudaError_t launch(const FusedMhaFwdParams& p, cudaStream_t stream) {
  const size_t smem = Layout<D>::bytes(padded_keys(p.k_len));
  auto kernel = fused_mha_fwd_kernel<T, D, MASK>;
  // The opt-in limit is state of the function (per device), not of the launch: another host
  // thread setting a smaller one between this thread's set and launch would fail the launch.
  // Setting and launching under one lock per kernel keeps each pair together (a launch is
  // asynchronous: the lock is held for microseconds).
  static std::mutex mutex;
  const std::lock_guard<std::mutex> lock(mutex);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.q_len + kBM - 1) / kBM), static_cast<unsigned>(p.heads),
                  static_cast<unsigned>(p.batch));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_mask(const FusedMhaFwdParams& p, cudaStream_t stream) {
  switch (p.mask_kind) {
    case MaskKind::kBool: return launch<T, D, MaskKind::kBool>(p, stream);
    case MaskKind::kSameAsInput: return launch<T, D, MaskKind::kSameAsInput>(p, stream);
    case MaskKind::kFloat32: return launch<T, D, MaskKind::kFloat32>(p, stream);
    default: return launch<T, D, MaskKind::kNone>(p, stream);
  }
}

template <typename T>
cudaError_t launch_dim(const FusedMhaFwdParams& p, cudaStream_t stream) {
  return p.head_dim == 64 ? launch_mask<T, 64>(p, stream) : launch_mask<T, 128>(p, stream);
}

}  // namespace fused_mha

size_t fused_mha_fwd_smem_bytes(const FusedMhaFwdParams& params) {
  const int lk_pad = fused_mha::padded_keys(params.k_len);
  return params.head_dim == 64 ? fused_mha::Layout<64>::bytes(lk_pad) : fused_mha::Layout<128>::bytes(lk_pad);
}

const char* fused_mha_fwd_unsupported(const FusedMhaFwdParams& p, size_t max_smem) {
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return "dtype is not float16 / bfloat16";
  if (p.head_dim != 64 && p.head_dim != 128) return "head dim is not 64 or 128";
  if (p.k_len < 1 || p.k_len > kFusedMhaMaxKeys) return "key length is not in [1, 512]";
  if (p.q_len < 1 || p.batch < 1 || p.heads < 1) return "empty input";
  if (p.batch > 65535 || p.heads > 65535 || (p.q_len + fused_mha::kBM - 1) / fused_mha::kBM > 0x7fffffff)
    return "grid too large";
  if ((p.cu_seqlens_q == nullptr) != (p.cu_seqlens_k == nullptr)) return "only one of cu_seqlens_q / _k";
  if (p.cu_seqlens_q != nullptr && p.mask_kind != MaskKind::kNone) return "a mask with cu_seqlens";
  const int per = 8;  // elements per 16 bytes
  const int64_t strides[] = {p.q_stride_b, p.q_stride_h, p.q_stride_l, p.k_stride_b, p.k_stride_h,
                             p.k_stride_l, p.v_stride_b, p.v_stride_h, p.v_stride_l,
                             p.out_stride_b, p.out_stride_h, p.out_stride_l};
  for (int64_t s : strides)
    if (s % per != 0) return "q / k / v strides are not multiples of 8 elements";
  if (!is_aligned(p.q, 16) || !is_aligned(p.k, 16) || !is_aligned(p.v, 16) || !is_aligned(p.out, 16))
    return "q / k / v / out are not 16-byte aligned";
  if (fused_mha_fwd_smem_bytes(p) > max_smem) return "not enough shared memory per block";
  return "";
}

Status fused_mha_fwd(const FusedMhaFwdParams& params, cudaStream_t stream) {
  if (fused_mha_fwd_unsupported(params, ~size_t{0})[0] != '\0') return cudaErrorInvalidValue;
  switch (params.dtype) {
    case DType::kFloat16: return fused_mha::launch_dim<__half>(params, stream);
    case DType::kBFloat16: return fused_mha::launch_dim<__nv_bfloat16>(params, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastbert
