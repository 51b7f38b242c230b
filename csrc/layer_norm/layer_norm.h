// LayerNorm and add + bias + dropout + residual + LayerNorm: params structs and launchers.
//
// Both ops share one forward and one backward kernel family; plain LayerNorm is the fused op with
// no residual, no input bias and no dropout. All tensors are viewed as [rows, cols] (cols = the
// normalised width) with a contiguous last dim; inputs may have any row stride.
#pragma once

#include <cstdint>

#include "common.h"

namespace fastbert {

struct LayerNormFwdParams {
  DType dtype = DType::kFloat32;  // dtype of every tensor below except x, mean / rstd (fp32)
  // dtype of x: dtype, or (fused op, dtype fp32) fp16 / bf16: mixed precision, a 16-bit matmul
  // output added to an fp32 residual stream, read as it is (no cast pass). Set it always.
  DType x_dtype = DType::kFloat32;
  int64_t rows = 0, cols = 0;
  // s = dropout(x + input_bias) + residual; y = (s - mean(s)) * rstd(s) * weight + bias
  const void* x = nullptr;          // [rows, cols], row stride x_stride (elements)
  int64_t x_stride = 0;
  const void* residual = nullptr;   // [rows, cols], row stride residual_stride; nullptr: none
  int64_t residual_stride = 0;
  const void* input_bias = nullptr; // [cols] or nullptr
  const void* weight = nullptr;     // [cols] or nullptr (= 1)
  const void* bias = nullptr;       // [cols] or nullptr (= 0)
  void* out = nullptr;              // [rows, cols] contiguous: y
  void* sum = nullptr;              // [rows, cols] contiguous: s, or nullptr (plain LayerNorm)
  float* mean = nullptr;            // [rows]
  float* rstd = nullptr;            // [rows]: 1 / sqrt(biased var + eps)
  float eps = 1e-5f;
  DropoutParams dropout;            // on x + input_bias; element index row * cols + col
};

struct LayerNormBwdParams {
  DType dtype = DType::kFloat32;
  int64_t rows = 0, cols = 0;
  const void* grad_out = nullptr;   // [rows, cols], row stride grad_out_stride: dL/dy
  int64_t grad_out_stride = 0;
  const void* grad_sum = nullptr;   // [rows, cols] contiguous: dL/ds from a returned s, or nullptr
  const void* x = nullptr;          // [rows, cols], row stride x_stride: the normalised input
  int64_t x_stride = 0;             //   (plain: the input; fused: the saved sum s)
  const void* weight = nullptr;     // [cols] or nullptr
  const float* mean = nullptr;      // [rows]
  const float* rstd = nullptr;      // [rows]
  void* grad_x = nullptr;           // [rows, cols] contiguous: dL/dx (plain) or dL/ds = dL/dresidual
  void* grad_input = nullptr;       // [rows, cols] contiguous: dL/dinput = dropout'(dL/ds), or nullptr
                                    //   (fused op without dropout, input in dtype: it equals grad_x)
  DType grad_input_dtype = DType::kFloat32;  // the input's dtype: dtype, or fp16 / bf16 with dtype
                                             //   fp32 (see LayerNormFwdParams::x_dtype). Set it always.
  DropoutParams dropout;            // the forward's dropout (fused only; p = 0 otherwise)
  // Deterministic column sums: slot s accumulates rows s, s + slots, s + 2 * slots, ... into
  // partial_*[s, :] (fp32, zero-initialised by the caller); a second kernel sums the slots in a
  // fixed order into grad_weight / grad_bias / grad_input_bias ([cols], dtype). Any may be nullptr.
  int slots = 0;                    // from layer_norm_bwd_slots()
  float* partial_weight = nullptr;  // [slots, cols]
  float* partial_bias = nullptr;
  float* partial_input_bias = nullptr;
  void* grad_weight = nullptr;
  void* grad_bias = nullptr;
  void* grad_input_bias = nullptr;
};

Status layer_norm_fwd(const LayerNormFwdParams& params, cudaStream_t stream);

// Number of row slots the backward kernel uses for these params on a device with `num_sms` SMs
// (size of the partial buffers' first dim). Depends only on dtype, rows, cols and alignment.
int layer_norm_bwd_slots(const LayerNormBwdParams& params, int num_sms);

Status layer_norm_bwd(const LayerNormBwdParams& params, cudaStream_t stream);

}  // namespace fastbert
