// Attention for encoder shapes: params structs and launchers.
//
// The unfused path runs the two batched GEMMs of each direction through torch (cuBLAS) in the
// binding and the rest in the kernels declared here:
//   forward:  S = Q K^T (GEMM);  P = softmax(S * scale + mask) (softmax_fwd, also dropout);  O = P V
//   backward: dPd = dO V^T (GEMM);  dS = P * (dP - rowsum(dP * P)) (softmax_bwd, which also
//             regenerates the dropout mask and the dropped probabilities);  dQ, dK, dV (GEMMs).
#pragma once

#include <cstdint>

#include "common.h"

namespace fastbert {

// How attn_mask is stored: absent, bool (True = attend), or floating added to the scores
// (in the dtype of the scores, or fp32).
enum class MaskKind : int { kNone = 0, kBool = 1, kSameAsInput = 2, kFloat32 = 3 };

struct SoftmaxFwdParams {
  DType dtype = DType::kFloat32;      // dtype of scores / probs / probs_dropped
  int64_t batch = 0, heads = 0, q_len = 0, k_len = 0;
  const void* scores = nullptr;       // [B, H, Lq, Lk] contiguous: Q K^T (unscaled)
  void* probs = nullptr;              // [B, H, Lq, Lk] contiguous: P (may alias scores)
  void* probs_dropped = nullptr;      // [B, H, Lq, Lk] contiguous: dropout(P), or nullptr if p == 0
  MaskKind mask_kind = MaskKind::kNone;
  const void* mask = nullptr;         // element (b, h, i, j) at b*sb + h*sh + i*sq + j*sk
  int64_t mask_stride_b = 0, mask_stride_h = 0, mask_stride_q = 0, mask_stride_k = 0;  // 0 = broadcast
  float scale = 1.f;
  bool causal = false;                // key j is masked for query i when j > i (top-left aligned)
  DropoutParams dropout;              // element index ((b * H + h) * Lq + i) * Lk + j
};

struct SoftmaxBwdParams {
  DType dtype = DType::kFloat32;
  int64_t rows = 0, cols = 0;         // rows = B * H * Lq, cols = Lk; all tensors contiguous
  const void* probs = nullptr;        // [rows, cols]: P from the forward
  void* grad = nullptr;               // in: dL/dPd; out (in place): dL/dS * out_scale
  void* probs_dropped = nullptr;      // out: dropout(P) regenerated, or nullptr (p == 0)
  float out_scale = 1.f;              // the softmax scale, so that dQ = grad K and dK = grad^T Q
  DropoutParams dropout;
};

struct DropoutMaskParams {
  int64_t numel = 0;
  bool* keep = nullptr;               // [numel]: True where element e is kept
  DropoutParams dropout;
};

// Fused multi-head attention forward on tensor cores (WMMA, sm_80+), FasterTransformer's fused MHA
// for encoder shapes: one block computes a 64-query tile of one (batch, head) entirely on chip.
// Inference only (it saves nothing for backward), no dropout; fp16 / bf16; head dim 64 or 128
// (value head dim equal); up to 512 keys; no mask, a bool mask or a float mask added to the scaled
// scores (in the inputs' dtype or fp32), with any broadcast strides (a key padding mask is
// (B, 1, 1, Lk)); causal (top-left) optional. q / k / v rows must be 16-byte aligned
// (last dim contiguous, other strides multiples of 8 elements).
// Variable length (ByteTransformer's padding-free fused MHA): with cu_seqlens_q / cu_seqlens_k set,
// "batch" counts sequences, q / k / v / out hold every sequence's tokens packed ([total, H, D]:
// the *_stride_b are 0 and row r of sequence b is token cu_seqlens[b] + r), q_len / k_len are the
// longest lengths (they size the grid and shared memory), and each block reads its sequence's own
// lengths; no mask (the lengths are the mask).
struct FusedMhaFwdParams {
  DType dtype = DType::kFloat16;      // kFloat16 or kBFloat16
  int64_t batch = 0, heads = 0, q_len = 0, k_len = 0;
  int head_dim = 64;                  // 64 or 128
  const void* q = nullptr;            // [B, H, Lq, D] with strides (q_stride_b, q_stride_h, q_stride_l, 1)
  int64_t q_stride_b = 0, q_stride_h = 0, q_stride_l = 0;
  const void* k = nullptr;            // [B, H, Lk, D]
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_l = 0;
  const void* v = nullptr;            // [B, H, Lk, D]
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_l = 0;
  void* out = nullptr;                // [B, H, Lq, D] with strides (out_stride_b, out_stride_h, out_stride_l, 1)
  int64_t out_stride_b = 0, out_stride_h = 0, out_stride_l = 0;
  const int32_t* cu_seqlens_q = nullptr;  // [batch + 1] cumulative query lengths, or nullptr (dense)
  const int32_t* cu_seqlens_k = nullptr;  // [batch + 1] cumulative key lengths (set with cu_seqlens_q)
  MaskKind mask_kind = MaskKind::kNone;
  const void* mask = nullptr;
  int64_t mask_stride_b = 0, mask_stride_h = 0, mask_stride_q = 0, mask_stride_k = 0;
  float scale = 1.f;
  bool causal = false;
};

constexpr int kFusedMhaMaxKeys = 512;

// Dynamic shared memory the fused kernel needs for these params (bytes).
size_t fused_mha_fwd_smem_bytes(const FusedMhaFwdParams& params);
// Empty string when the fused kernel can serve `params` on a device allowing `max_smem` bytes of
// shared memory per block; otherwise why not (the binding then runs the unfused path).
const char* fused_mha_fwd_unsupported(const FusedMhaFwdParams& params, size_t max_smem);
Status fused_mha_fwd(const FusedMhaFwdParams& params, cudaStream_t stream);

Status softmax_fwd(const SoftmaxFwdParams& params, cudaStream_t stream);
Status softmax_bwd(const SoftmaxBwdParams& params, cudaStream_t stream);
Status dropout_mask(const DropoutMaskParams& params, int num_sms, cudaStream_t stream);

}  // namespace fastbert
