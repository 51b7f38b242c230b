// bias + GELU and GEGLU (exact erf form and tanh approximation): params structs and launchers.
#pragma once

#include <cstdint>

#include "common.h"

namespace fastbert {

struct BiasGeluParams {
  DType dtype = DType::kFloat32;
  int64_t rows = 0, cols = 0;       // every tensor below is contiguous [rows, cols] or [cols]
  const void* x = nullptr;          // [rows, cols]: input (before the bias)
  const void* bias = nullptr;       // [cols] or nullptr
  const void* grad_out = nullptr;   // backward: [rows, cols] dL/dy
  void* out = nullptr;              // forward: y = gelu(x + bias); backward: dL/dx
  bool tanh_approx = false;         // false: 0.5 z (1 + erf(z / sqrt 2)); true: the tanh form
  // Backward with grad_bias set: per-slot column sums of dL/dx (fp32, [slots, cols]) reduced by
  // column_sum into grad_bias ([cols], dtype); `slots` from bias_gelu_bwd_slots(). Without
  // grad_bias the backward is purely elementwise.
  int slots = 0;
  float* partial_bias = nullptr;
  void* grad_bias = nullptr;
};

Status bias_gelu_fwd(const BiasGeluParams& params, int num_sms, cudaStream_t stream);
int bias_gelu_bwd_slots(const BiasGeluParams& params, int num_sms);
Status bias_gelu_bwd(const BiasGeluParams& params, int num_sms, cudaStream_t stream);

// GEGLU: y = gelu(a) * g over [rows, cols] matrices with a unit column stride and any row stride
// (in elements); a packed [rows, 2 cols] input is passed as its two halves (g = a + cols).
struct GegluParams {
  DType dtype = DType::kFloat32;
  int64_t rows = 0, cols = 0;
  const void* a = nullptr;          // the GELU input
  const void* g = nullptr;          // the gate
  int64_t a_row_stride = 0, g_row_stride = 0;
  const void* grad_out = nullptr;   // backward: dL/dy, contiguous [rows, cols]
  void* out = nullptr;              // forward: y; backward: dL/da
  int64_t out_row_stride = 0;
  void* grad_gate = nullptr;        // backward: dL/dg
  int64_t grad_gate_row_stride = 0;
  bool tanh_approx = false;
};

Status geglu_fwd(const GegluParams& params, int num_sms, cudaStream_t stream);
Status geglu_bwd(const GegluParams& params, int num_sms, cudaStream_t stream);

}  // namespace fastbert
