// The one binding file of the fastbert CUDA extension (fastbert._C).
//
// Registers the operator schemas in the `fastbert_cuda` namespace (torch.ops.fastbert_cuda.*),
// checks every input with TORCH_CHECK (naming the op and the argument), fills the plain params
// structs of the kernel families and launches them on the current CUDA stream. Fake (meta)
// implementations and autograd formulas are registered from Python (fastbert/ops/*.py) when the
// extension is first used.
//
// Dropout: forward ops draw a 63-bit seed on the device, with the default CUDA generator of the
// inputs' device (at::randint: torch.manual_seed reproduces it), and return it as a 1-element
// int64 CUDA tensor; kernels read it from device memory and backward ops take it back, so the host
// never sees the value (no sync) and the op stays a pure function of its inputs and outputs. Under
// CUDA graph capture the draw is captured like any torch random op, so every replay draws a fresh
// seed (a fresh mask) instead of reusing the one of the capture. `dropout_mask` materialises the
// keep-mask of a seed for tests.
#include <Python.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include "attention/attention.h"
#include "common.h"
#include "gelu/gelu.h"
#include "layer_norm/layer_norm.h"

// `import fastbert._C` loads this library, which runs the TORCH_LIBRARY registrations below. The
// module itself is empty: the ops live in torch.ops.fastbert_cuda.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "fastbert CUDA kernels; the operators are registered as torch.ops.fastbert_cuda.*",
      -1,
      nullptr,
      nullptr,
      nullptr,
      nullptr,
      nullptr};
  return PyModule_Create(&module_def);
}

namespace fastbert {
namespace {

using OptTensor = std::optional<at::Tensor>;

// ---------------------------------------------------------------------------------------------
// Checks and helpers
// ---------------------------------------------------------------------------------------------
DType dtype_of(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    default: break;
  }
  TORCH_CHECK(false, "fastbert_cuda::", op, ": ", name, " must be float16, bfloat16 or float32, got ",
              t.scalar_type());
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
#ifdef FASTBERT_EMULATE
  // tests/cuda_emu: the launchers run emulated kernels over CPU memory
  TORCH_CHECK(t.is_cpu(), "fastbert_emu::", op, ": ", name, " must be a CPU tensor, got one on ", t.device());
#else
  TORCH_CHECK(t.is_cuda(), "fastbert_cuda::", op, ": ", name, " must be a CUDA tensor, got one on ",
              t.device());
#endif
}

// `t` is on ref's device, with ref's dtype when `same_dtype`.
void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                const char* ref_name, bool same_dtype = true) {
  check_cuda(t, op, name);
  TORCH_CHECK(t.device() == ref.device(), "fastbert_cuda::", op, ": ", name, " is on ", t.device(),
              " but ", ref_name, " is on ", ref.device());
  TORCH_CHECK(!same_dtype || t.scalar_type() == ref.scalar_type(), "fastbert_cuda::", op, ": ", name,
              " has dtype ", t.scalar_type(), " but ", ref_name, " has ", ref.scalar_type(),
              "; they must match");
}

void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == dim, "fastbert_cuda::", op, ": ", name, " must be ", dim, "-D, got shape ",
              t.sizes());
}

void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == shape, "fastbert_cuda::", op, ": ", name, " must have shape ", shape,
              ", got ", t.sizes());
}

void check_dropout(double p, const char* op) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fastbert_cuda::", op, ": dropout_p must be in [0, 1), got ", p);
}

// A [rows, cols] matrix whose last dim is contiguous (any row stride).
at::Tensor rows_of(const at::Tensor& t) {
  return t.stride(1) == 1 ? t : t.contiguous();
}

// An optional [cols] vector, checked against `ref`, made contiguous; nullptr data when absent.
at::Tensor vector_arg(const OptTensor& t, int64_t cols, const at::Tensor& ref, const char* op,
                      const char* name, const char* ref_name = "input") {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  check_like(*t, ref, op, name, ref_name);
  check_shape(*t, {cols}, op, name);
  return t->contiguous();
}

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
void* mutable_data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

void check_launch(Status status, const char* op) {
  TORCH_CHECK(status == kSuccess, "fastbert_cuda::", op, ": CUDA error: ", status_string(status));
}

// Guard that makes `device` current for the kernels and allocations of one op.
using DeviceGuard = c10::DeviceGuard;

// The current torch stream of `device` (torch's CUDA stream, as a cudaStream_t).
cudaStream_t current_stream(const at::Device& device) {
#ifdef FASTBERT_EMULATE
  (void)device;
  return nullptr;  // tests/cuda_emu: a launch runs to completion on the calling thread
#else
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device);
  return static_cast<cudaStream_t>(stream.native_handle());
#endif
}

// A per-device property, queried once (static storage: zero-initialised).
template <typename Query>
int64_t cached_property(std::array<std::atomic<int64_t>, 64>& cache, int device, const char* what, Query query) {
  if (device >= 0 && device < static_cast<int>(cache.size())) {
    const int64_t cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  Status status = kSuccess;
  const int64_t value = static_cast<int64_t>(query(device, &status));
  check_launch(status, what);
  if (device >= 0 && device < static_cast<int>(cache.size())) cache[device].store(value, std::memory_order_relaxed);
  return value;
}

// Number of SMs of `device` (it sizes grid-stride grids and the column-sum slots).
int num_sms(int device) {
  static std::array<std::atomic<int64_t>, 64> cache;
  return static_cast<int>(cached_property(cache, device, "num_sms", device_sm_count));
}

// Largest dynamic shared memory a block may opt into on `device`.
size_t max_smem_per_block(int device) {
  static std::array<std::atomic<int64_t>, 64> cache;
  return static_cast<size_t>(cached_property(cache, device, "max_smem_per_block", device_max_smem_per_block));
}

// A fresh dropout seed in [0, 2^63 - 1), drawn on `device` by torch's default generator of that
// device (a Philox kernel on the current stream: no host sync, graph-safe, reproduced by
// torch.manual_seed), as a [1] int64 tensor. The kernels take any 64-bit seed (philox4x32_10 keys
// on both halves). Empty, and nothing launched, when dropout is off.
at::Tensor draw_seed(double p, const at::Device& device) {
  const auto options = at::TensorOptions().dtype(at::kLong).device(device);
  if (p <= 0.0) return at::empty({0}, options);
  return at::randint(std::numeric_limits<int64_t>::max(), {1}, options);
}

DropoutParams dropout_params(double p, const at::Tensor& seed, const at::Tensor& ref, const char* op) {
  check_dropout(p, op);
  DropoutParams d;
  d.p = static_cast<float>(p);
  d.scale = static_cast<float>(1.0 / (1.0 - p));
  if (p > 0.0) {
    check_like(seed, ref, op, "seed", "input", /*same_dtype=*/false);
    TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1, "fastbert_cuda::", op,
                ": seed must be the 1-element int64 tensor returned by the forward op, got ",
                seed.scalar_type(), " of shape ", seed.sizes());
    d.seed = seed.data_ptr<int64_t>();
  }
  return d;
}

}  // namespace

// The operators (fastbert::ops::X serves torch.ops.fastbert_cuda.X).
namespace ops {

// ---------------------------------------------------------------------------------------------
// LayerNorm
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& input, const OptTensor& weight,
                                                              const OptTensor& bias, double eps) {
  const char* op = "layer_norm_fwd";
  check_cuda(input, op, "input");
  check_dim(input, 2, op, "input");
  const DType dtype = dtype_of(input, op, "input");
  TORCH_CHECK(eps >= 0.0, "fastbert_cuda::", op, ": eps must be >= 0, got ", eps);
  const DeviceGuard guard(input.device());
  const int64_t rows = input.size(0), cols = input.size(1);
  const at::Tensor x = rows_of(input);
  const at::Tensor w = vector_arg(weight, cols, input, op, "weight");
  const at::Tensor b = vector_arg(bias, cols, input, op, "bias");
  at::Tensor out = at::empty({rows, cols}, input.options());
  at::Tensor mean = at::empty({rows}, input.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, input.options().dtype(at::kFloat));

  LayerNormFwdParams p;
  p.dtype = dtype;
  p.x_dtype = dtype;
  p.rows = rows;
  p.cols = cols;
  p.x = x.data_ptr();
  p.x_stride = x.stride(0);
  p.weight = data_or_null(w);
  p.bias = data_or_null(b);
  p.out = out.data_ptr();
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.eps = static_cast<float>(eps);
  check_launch(fastbert::layer_norm_fwd(p, current_stream(input.device())), op);
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd(
    const at::Tensor& input, const at::Tensor& residual, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& input_bias, double eps, double dropout_p) {
  const char* op = "add_layer_norm_fwd";
  check_cuda(input, op, "input");
  check_dim(input, 2, op, "input");
  const DType x_dtype = dtype_of(input, op, "input");
  // Everything but the input in the residual's dtype; the input in it too, or (mixed precision) a
  // 16-bit input with an fp32 residual, read as it is.
  check_like(residual, input, op, "residual", "input", /*same_dtype=*/false);
  const DType dtype = dtype_of(residual, op, "residual");
  TORCH_CHECK(x_dtype == dtype || dtype == DType::kFloat32, "fastbert_cuda::", op,
              ": input (", input.scalar_type(), ") and residual (", residual.scalar_type(),
              ") must have one dtype, or the input a 16-bit one with a float32 residual");
  check_shape(residual, input.sizes(), op, "residual");
  TORCH_CHECK(eps >= 0.0, "fastbert_cuda::", op, ": eps must be >= 0, got ", eps);
  check_dropout(dropout_p, op);
  const DeviceGuard guard(input.device());
  const int64_t rows = input.size(0), cols = input.size(1);
  const at::Tensor x = rows_of(input);
  const at::Tensor r = rows_of(residual);
  const at::Tensor w = vector_arg(weight, cols, residual, op, "weight", "residual");
  const at::Tensor b = vector_arg(bias, cols, residual, op, "bias", "residual");
  const at::Tensor ib = vector_arg(input_bias, cols, residual, op, "input_bias", "residual");
  at::Tensor out = at::empty({rows, cols}, residual.options());
  at::Tensor sum = at::empty({rows, cols}, residual.options());
  at::Tensor mean = at::empty({rows}, input.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, input.options().dtype(at::kFloat));
  at::Tensor seed = draw_seed(dropout_p, input.device());

  LayerNormFwdParams p;
  p.dtype = dtype;
  p.x_dtype = x_dtype;
  p.rows = rows;
  p.cols = cols;
  p.x = x.data_ptr();
  p.x_stride = x.stride(0);
  p.residual = r.data_ptr();
  p.residual_stride = r.stride(0);
  p.input_bias = data_or_null(ib);
  p.weight = data_or_null(w);
  p.bias = data_or_null(b);
  p.out = out.data_ptr();
  p.sum = sum.data_ptr();
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.eps = static_cast<float>(eps);
  p.dropout = dropout_params(dropout_p, seed, input, op);
  check_launch(fastbert::layer_norm_fwd(p, current_stream(input.device())), op);
  return {out, sum, mean, rstd, seed};
}

// Shared by both backward ops: checks, partial buffers, launch. `grad_input` / `grad_input_bias`
// are defined only for the fused op.
void run_layer_norm_bwd(const char* op, const at::Tensor& grad_out, const OptTensor& grad_sum,
                        const at::Tensor& x_in, const OptTensor& weight, const at::Tensor& mean,
                        const at::Tensor& rstd, const DropoutParams& dropout, const at::Tensor& grad_x,
                        const at::Tensor& grad_input, const at::Tensor& grad_weight,
                        const at::Tensor& grad_bias, const at::Tensor& grad_input_bias) {
  const int64_t rows = x_in.size(0), cols = x_in.size(1);
  check_like(grad_out, x_in, op, "grad_out", "input");
  check_shape(grad_out, x_in.sizes(), op, "grad_out");
  for (const at::Tensor* stat : {&mean, &rstd}) {
    check_like(*stat, x_in, op, stat == &mean ? "mean" : "rstd", "input", /*same_dtype=*/false);
    TORCH_CHECK(stat->scalar_type() == at::kFloat && stat->sizes() == at::IntArrayRef({rows}),
                "fastbert_cuda::", op, ": ", stat == &mean ? "mean" : "rstd",
                " must be the float32 [rows] tensor of the forward, got ", stat->scalar_type(), " ",
                stat->sizes());
  }
  const at::Tensor x = rows_of(x_in);
  const at::Tensor dy = rows_of(grad_out);
  const at::Tensor w = vector_arg(weight, cols, x_in, op, "weight");
  at::Tensor gs;
  if (grad_sum.has_value() && grad_sum->defined()) {
    check_like(*grad_sum, x_in, op, "grad_sum", "input");
    check_shape(*grad_sum, x_in.sizes(), op, "grad_sum");
    gs = grad_sum->contiguous();
  }
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();

  LayerNormBwdParams p;
  p.dtype = dtype_of(x_in, op, "input");
  p.rows = rows;
  p.cols = cols;
  p.grad_out = dy.data_ptr();
  p.grad_out_stride = dy.stride(0);
  p.grad_sum = data_or_null(gs);
  p.x = x.data_ptr();
  p.x_stride = x.stride(0);
  p.weight = data_or_null(w);
  p.mean = mean_c.data_ptr<float>();
  p.rstd = rstd_c.data_ptr<float>();
  p.grad_x = grad_x.data_ptr();
  p.grad_input = mutable_data_or_null(grad_input);
  p.grad_input_dtype = grad_input.defined() ? dtype_of(grad_input, op, "grad_input") : p.dtype;
  p.dropout = dropout;
  p.grad_weight = mutable_data_or_null(grad_weight);
  p.grad_bias = mutable_data_or_null(grad_bias);
  p.grad_input_bias = mutable_data_or_null(grad_input_bias);
  if (rows == 0 || cols == 0) {
    // Nothing to launch; column sums over zero rows are zero.
    for (const at::Tensor* g : {&grad_weight, &grad_bias, &grad_input_bias})
      if (g->defined()) g->zero_();
    return;
  }
  // One zero-initialised [slots, cols] fp32 buffer per requested column sum; each is a separate
  // (256-byte aligned) allocation, so the vectorised paths chosen when sizing them still apply.
  p.slots = layer_norm_bwd_slots(p, num_sms(x_in.get_device()));
  const auto partial = [&](const void* grad) {
    return grad != nullptr ? at::zeros({p.slots, cols}, x_in.options().dtype(at::kFloat)) : at::Tensor();
  };
  const at::Tensor partial_w = partial(p.grad_weight), partial_b = partial(p.grad_bias),
                   partial_ib = partial(p.grad_input_bias);
  p.partial_weight = partial_w.defined() ? partial_w.data_ptr<float>() : nullptr;
  p.partial_bias = partial_b.defined() ? partial_b.data_ptr<float>() : nullptr;
  p.partial_input_bias = partial_ib.defined() ? partial_ib.data_ptr<float>() : nullptr;
  check_launch(fastbert::layer_norm_bwd(p, current_stream(x_in.device())), op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& grad_out, const at::Tensor& input,
                                                              const OptTensor& weight, const at::Tensor& mean,
                                                              const at::Tensor& rstd, bool need_weight_grad,
                                                              bool need_bias_grad) {
  const char* op = "layer_norm_bwd";
  check_cuda(input, op, "input");
  check_dim(input, 2, op, "input");
  dtype_of(input, op, "input");
  const DeviceGuard guard(input.device());
  const int64_t cols = input.size(1);
  const bool dw = need_weight_grad && weight.has_value() && weight->defined();
  at::Tensor grad_x = at::empty(input.sizes(), input.options());
  at::Tensor grad_weight = at::empty({dw ? cols : 0}, input.options());
  at::Tensor grad_bias = at::empty({need_bias_grad ? cols : 0}, input.options());
  run_layer_norm_bwd(op, grad_out, std::nullopt, input, weight, mean, rstd, DropoutParams(), grad_x,
                     at::Tensor(), dw ? grad_weight : at::Tensor(), need_bias_grad ? grad_bias : at::Tensor(),
                     at::Tensor());
  return {grad_x, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_bwd(
    const at::Tensor& grad_out, const OptTensor& grad_sum, const at::Tensor& sum, const OptTensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& seed, double dropout_p,
    bool need_weight_grad, bool need_bias_grad, bool need_input_bias_grad,
    std::optional<at::ScalarType> input_dtype) {
  const char* op = "add_layer_norm_bwd";
  check_cuda(sum, op, "sum");
  check_dim(sum, 2, op, "sum");
  dtype_of(sum, op, "sum");
  const at::ScalarType in_dtype = input_dtype.value_or(sum.scalar_type());
  TORCH_CHECK(in_dtype == sum.scalar_type() ||
                  (sum.scalar_type() == at::kFloat && (in_dtype == at::kHalf || in_dtype == at::kBFloat16)),
              "fastbert_cuda::", op, ": input_dtype ", in_dtype, " with a ", sum.scalar_type(),
              " sum: the forward takes one dtype, or a 16-bit input with a float32 residual");
  const DeviceGuard guard(sum.device());
  const int64_t cols = sum.size(1);
  const bool dw = need_weight_grad && weight.has_value() && weight->defined();
  const DropoutParams dropout = dropout_params(dropout_p, seed, sum, op);
  // Without dropout dL/dinput = dL/dresidual: grad_input is returned empty and the caller reuses
  // grad_residual (one [rows, cols] write saved), unless the input has a dtype of its own. With
  // dropout the kernel writes both.
  const bool separate = dropout_p > 0.0 || in_dtype != sum.scalar_type();
  at::Tensor grad_input = at::empty(separate ? sum.sizes() : at::IntArrayRef({0}), sum.options().dtype(in_dtype));
  at::Tensor grad_residual = at::empty(sum.sizes(), sum.options());
  at::Tensor grad_weight = at::empty({dw ? cols : 0}, sum.options());
  at::Tensor grad_bias = at::empty({need_bias_grad ? cols : 0}, sum.options());
  at::Tensor grad_input_bias = at::empty({need_input_bias_grad ? cols : 0}, sum.options());
  // The input bias gradient sums dL/dinput, which is grad_residual when there is no dropout; the
  // kernel's grad_input path computes it either way.
  run_layer_norm_bwd(op, grad_out, grad_sum, sum, weight, mean, rstd, dropout, grad_residual,
                     separate ? grad_input : at::Tensor(), dw ? grad_weight : at::Tensor(),
                     need_bias_grad ? grad_bias : at::Tensor(),
                     need_input_bias_grad ? grad_input_bias : at::Tensor());
  return {grad_input, grad_residual, grad_weight, grad_bias, grad_input_bias};
}

// ---------------------------------------------------------------------------------------------
// bias + GELU
// ---------------------------------------------------------------------------------------------
bool tanh_flag(c10::string_view approximate, const char* op) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh", "fastbert_cuda::", op,
              ": approximate must be 'none' or 'tanh', got '", approximate, "'");
  return approximate == "tanh";
}

at::Tensor bias_gelu_fwd(const at::Tensor& input, const OptTensor& bias, c10::string_view approximate) {
  const char* op = "bias_gelu_fwd";
  check_cuda(input, op, "input");
  TORCH_CHECK(input.dim() >= 1, "fastbert_cuda::", op, ": input must have at least 1 dim");
  const DType dtype = dtype_of(input, op, "input");
  const bool tanh_approx = tanh_flag(approximate, op);
  const DeviceGuard guard(input.device());
  const int64_t cols = input.size(-1);
  const at::Tensor x = input.contiguous();
  const at::Tensor b = vector_arg(bias, cols, input, op, "bias");
  at::Tensor out = at::empty(input.sizes(), input.options());
  BiasGeluParams p;
  p.dtype = dtype;
  p.rows = cols == 0 ? 0 : input.numel() / cols;
  p.cols = cols;
  p.x = x.data_ptr();
  p.bias = data_or_null(b);
  p.out = out.data_ptr();
  p.tanh_approx = tanh_approx;
  check_launch(fastbert::bias_gelu_fwd(p, num_sms(input.get_device()), current_stream(input.device())), op);
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd(const at::Tensor& grad_out, const at::Tensor& input,
                                                 const OptTensor& bias, c10::string_view approximate,
                                                 bool need_bias_grad) {
  const char* op = "bias_gelu_bwd";
  check_cuda(input, op, "input");
  TORCH_CHECK(input.dim() >= 1, "fastbert_cuda::", op, ": input must have at least 1 dim");
  const DType dtype = dtype_of(input, op, "input");
  check_like(grad_out, input, op, "grad_out", "input");
  check_shape(grad_out, input.sizes(), op, "grad_out");
  const bool tanh_approx = tanh_flag(approximate, op);
  const DeviceGuard guard(input.device());
  const int64_t cols = input.size(-1);
  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_out.contiguous();
  const at::Tensor b = vector_arg(bias, cols, input, op, "bias");
  at::Tensor grad_input = at::empty(input.sizes(), input.options());
  const bool db = need_bias_grad && b.defined();
  at::Tensor grad_bias = at::empty({db ? cols : 0}, input.options());
  BiasGeluParams p;
  p.dtype = dtype;
  p.rows = cols == 0 ? 0 : input.numel() / cols;
  p.cols = cols;
  p.x = x.data_ptr();
  p.bias = data_or_null(b);
  p.grad_out = dy.data_ptr();
  p.out = grad_input.data_ptr();
  p.tanh_approx = tanh_approx;
  at::Tensor partial;
  if (db) {
    if (p.rows == 0) {
      grad_bias.zero_();
      return {grad_input, grad_bias};
    }
    const int sms = num_sms(input.get_device());
    p.slots = bias_gelu_bwd_slots(p, sms);
    partial = at::empty({p.slots, cols}, input.options().dtype(at::kFloat));  // fully written
    p.partial_bias = partial.data_ptr<float>();
    p.grad_bias = grad_bias.data_ptr();
    // The partial buffer's alignment can change the path, so recompute the slot count with it set.
    TORCH_CHECK(bias_gelu_bwd_slots(p, sms) == p.slots, "fastbert_cuda::", op, ": inconsistent slots");
  }
  check_launch(fastbert::bias_gelu_bwd(p, num_sms(input.get_device()), current_stream(input.device())), op);
  return {grad_input, grad_bias};
}

// ---------------------------------------------------------------------------------------------
// GEGLU
// ---------------------------------------------------------------------------------------------
// A geglu call's GELU input and gate as [rows, cols] matrices with a unit column stride (views,
// or contiguous copies of layouts that are not): the halves of a packed (..., 2 cols) input, or
// input and gate (..., cols). The params hold their pointers and row strides.
struct GegluOperands {
  at::Tensor a, g;
  std::vector<int64_t> out_shape;  // input's shape with the last dim cols
  GegluParams params;
};

GegluOperands geglu_operands(const at::Tensor& input, const OptTensor& gate, c10::string_view approximate,
                             const char* op) {
  GegluOperands o;
  GegluParams& p = o.params;
  p.tanh_approx = tanh_flag(approximate, op);
  p.dtype = dtype_of(input, op, "input");
  TORCH_CHECK(input.dim() >= 1, "fastbert_cuda::", op, ": input must have at least 1 dim");
  const bool packed = !gate.has_value() || !gate->defined();
  if (packed) {
    TORCH_CHECK(input.size(-1) % 2 == 0, "fastbert_cuda::", op,
                ": input must have an even last dim when gate is None, got shape ", input.sizes());
  } else {
    check_like(*gate, input, op, "gate", "input");
    check_shape(*gate, input.sizes(), op, "gate");
  }
  p.cols = packed ? input.size(-1) / 2 : input.size(-1);
  o.out_shape.assign(input.sizes().begin(), input.sizes().end());
  o.out_shape.back() = p.cols;
  if (input.numel() == 0) return o;  // rows = 0: nothing to launch
  if (packed) {
    const at::Tensor x = rows_of(input.reshape({-1, 2 * p.cols}));
    o.a = x.narrow(1, 0, p.cols);
    o.g = x.narrow(1, p.cols, p.cols);
  } else {
    o.a = rows_of(input.reshape({-1, p.cols}));
    o.g = rows_of(gate->reshape({-1, p.cols}));
  }
  p.rows = o.a.size(0);
  p.a = o.a.data_ptr();
  p.g = o.g.data_ptr();
  p.a_row_stride = o.a.stride(0);
  p.g_row_stride = o.g.stride(0);
  return o;
}

at::Tensor geglu_fwd(const at::Tensor& input, const OptTensor& gate, c10::string_view approximate) {
  const char* op = "geglu_fwd";
  check_cuda(input, op, "input");
  const DeviceGuard guard(input.device());
  GegluOperands o = geglu_operands(input, gate, approximate, op);
  at::Tensor out = at::empty(o.out_shape, input.options());
  o.params.out = out.data_ptr();
  o.params.out_row_stride = o.params.cols;
  check_launch(fastbert::geglu_fwd(o.params, num_sms(input.get_device()), current_stream(input.device())), op);
  return out;
}

// -> (dL/dinput, dL/dgate); packed (gate None): dL/dinput holds both halves' gradients and
// dL/dgate is empty.
std::tuple<at::Tensor, at::Tensor> geglu_bwd(const at::Tensor& grad_out, const at::Tensor& input,
                                             const OptTensor& gate, c10::string_view approximate) {
  const char* op = "geglu_bwd";
  check_cuda(input, op, "input");
  const DeviceGuard guard(input.device());
  GegluOperands o = geglu_operands(input, gate, approximate, op);
  GegluParams& p = o.params;
  check_like(grad_out, input, op, "grad_out", "input");
  check_shape(grad_out, o.out_shape, op, "grad_out");
  const bool packed = !gate.has_value() || !gate->defined();
  const at::Tensor dy = grad_out.contiguous();
  at::Tensor grad_input = at::empty(input.sizes(), input.options());
  at::Tensor grad_gate = at::empty(packed ? at::IntArrayRef({0}) : input.sizes(), input.options());
  p.grad_out = dy.data_ptr();
  p.out = grad_input.data_ptr();
  if (packed) {  // the gate's gradient is the second half of each row of grad_input
    p.grad_gate = static_cast<char*>(p.out) + p.cols * grad_input.element_size();
    p.out_row_stride = p.grad_gate_row_stride = 2 * p.cols;
  } else {
    p.grad_gate = grad_gate.data_ptr();
    p.out_row_stride = p.grad_gate_row_stride = p.cols;
  }
  check_launch(fastbert::geglu_bwd(p, num_sms(input.get_device()), current_stream(input.device())), op);
  return {grad_input, grad_gate};
}

// ---------------------------------------------------------------------------------------------
// Attention (unfused: cuBLAS GEMMs through torch around the softmax kernels)
// ---------------------------------------------------------------------------------------------
// attn_mask checked and expanded to (B, H, Lq, Lk) (strides 0 where it broadcasts); a floating
// mask of another dtype than the scores is converted to fp32 first. Sets the mask kind.
at::Tensor expand_mask(const at::Tensor& m, const at::Tensor& query, int64_t b, int64_t h, int64_t lq,
                       int64_t lk, const char* op, MaskKind* kind) {
  check_like(m, query, op, "attn_mask", "query", /*same_dtype=*/false);
  const std::array<int64_t, 4> target = {b, h, lq, lk};
  bool broadcasts = m.dim() <= 4;
  for (int64_t d = 0; broadcasts && d < m.dim(); ++d) {
    const int64_t size = m.size(m.dim() - 1 - d), want = target[3 - d];
    broadcasts = size == 1 || size == want;
  }
  TORCH_CHECK(broadcasts, "fastbert_cuda::", op, ": attn_mask of shape ", m.sizes(),
              " does not broadcast to (B, H, Lq, Lk) = ", at::IntArrayRef(target));
  at::Tensor mask;
  if (m.scalar_type() == at::kBool) {
    *kind = MaskKind::kBool;
    mask = m;
  } else if (m.scalar_type() == query.scalar_type()) {
    *kind = MaskKind::kSameAsInput;
    mask = m;
  } else {
    TORCH_CHECK(at::isFloatingType(m.scalar_type()), "fastbert_cuda::", op,
                ": attn_mask must be bool or floating, got ", m.scalar_type());
    *kind = MaskKind::kFloat32;
    mask = m.to(at::kFloat);  // before expanding: converts only the stored elements
  }
  return mask.expand({b, h, lq, lk});
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  check_cuda(q, op, "query");
  check_dim(q, 4, op, "query");
  dtype_of(q, op, "query");
  check_like(k, q, op, "key", "query");
  check_like(v, q, op, "value", "query");
  check_dim(k, 4, op, "key");
  check_dim(v, 4, op, "value");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "fastbert_cuda::", op, ": key ", k.sizes(), " must match query ", q.sizes(),
              " in batch, heads and head dim (B, H, L, D)");
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2),
              "fastbert_cuda::", op, ": value ", v.sizes(), " must match key ", k.sizes(),
              " in all but the last dim (B, H, Lk, Dv)");
}

// The fields the softmax and fused-attention params share: dtype, (B, H, Lq, Lk), scale, causal and
// the mask, read through its strides (`mask` keeps the expanded view alive).
template <typename Params>
void fill_attention_params(Params& p, const at::Tensor& query, const at::Tensor& key,
                           const OptTensor& attn_mask, bool is_causal, double scale, const char* op,
                           at::Tensor* mask) {
  const int64_t b = query.size(0), h = query.size(1), lq = query.size(2), lk = key.size(2);
  p.dtype = dtype_of(query, op, "query");
  p.batch = b;
  p.heads = h;
  p.q_len = lq;
  p.k_len = lk;
  p.scale = static_cast<float>(scale);
  p.causal = is_causal;
  if (attn_mask.has_value() && attn_mask->defined()) {
    *mask = expand_mask(*attn_mask, query, b, h, lq, lk, op, &p.mask_kind);
    p.mask = mask->data_ptr();
    p.mask_stride_b = mask->stride(0);
    p.mask_stride_h = mask->stride(1);
    p.mask_stride_q = mask->stride(2);
    p.mask_stride_k = mask->stride(3);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd(const at::Tensor& query, const at::Tensor& key,
                                                             const at::Tensor& value, const OptTensor& attn_mask,
                                                             double dropout_p, bool is_causal, double scale) {
  const char* op = "attention_fwd";
  check_qkv(query, key, value, op);
  check_dropout(dropout_p, op);
  TORCH_CHECK(scale > 0.0, "fastbert_cuda::", op, ": scale must be > 0, got ", scale);
  const DeviceGuard guard(query.device());
  const int64_t b = query.size(0), h = query.size(1), lq = query.size(2), lk = key.size(2);

  SoftmaxFwdParams p;
  at::Tensor mask;
  // scale 1 in the softmax: the GEMM below applies the real one
  fill_attention_params(p, query, key, attn_mask, is_causal, /*scale=*/1.0, op, &mask);

  // scale * [B*H, Lq, D] @ [B*H, D, Lk] -> [B, H, Lq, Lk]; the softmax overwrites it with P. The
  // scale is applied by the GEMM in fp32 before rounding (alpha; beta = 0 ignores the empty
  // input), so fp16 scores that only overflow unscaled (|q.k| > 65504) stay finite.
  const at::Tensor q3 = query.reshape({b * h, lq, query.size(3)});
  const at::Tensor k3 = key.reshape({b * h, lk, key.size(3)});
  at::Tensor probs = at::empty({b * h, lq, lk}, query.options());
  probs.baddbmm_(q3, k3.transpose(1, 2), /*beta=*/0, /*alpha=*/scale);
  probs = probs.view({b, h, lq, lk});
  at::Tensor seed = draw_seed(dropout_p, query.device());
  at::Tensor dropped = dropout_p > 0.0 ? at::empty_like(probs) : at::Tensor();
  p.scores = probs.data_ptr();
  p.probs = probs.data_ptr();
  p.probs_dropped = mutable_data_or_null(dropped);
  p.dropout = dropout_params(dropout_p, seed, query, op);
  check_launch(softmax_fwd(p, current_stream(query.device())), op);
  // [B, H, Lq, Lk] @ [B, H, Lk, Dv] -> [B, H, Lq, Dv]
  at::Tensor out = at::matmul(dropout_p > 0.0 ? dropped : probs, value);
  return {out, probs, seed};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& probs, const at::Tensor& seed, double dropout_p, double scale) {
  const char* op = "attention_bwd";
  check_qkv(query, key, value, op);
  const int64_t b = query.size(0), h = query.size(1), lq = query.size(2), lk = key.size(2);
  check_like(grad_out, query, op, "grad_out", "query");
  check_shape(grad_out, {b, h, lq, value.size(3)}, op, "grad_out");
  check_like(probs, query, op, "probs", "query");
  check_shape(probs, {b, h, lq, lk}, op, "probs");
  TORCH_CHECK(probs.is_contiguous(), "fastbert_cuda::", op, ": probs must be the contiguous tensor of the forward");
  const DeviceGuard guard(query.device());

  // [B, H, Lq, Dv] @ [B, H, Dv, Lk] -> [B, H, Lq, Lk] = dL/dPd; the kernel overwrites it with dS.
  at::Tensor grad_scores = at::matmul(grad_out, value.transpose(-2, -1)).contiguous();
  at::Tensor dropped = dropout_p > 0.0 ? at::empty_like(probs) : at::Tensor();
  SoftmaxBwdParams p;
  p.dtype = dtype_of(query, op, "query");
  p.rows = b * h * lq;
  p.cols = lk;
  p.probs = probs.data_ptr();
  p.grad = grad_scores.data_ptr();
  p.probs_dropped = mutable_data_or_null(dropped);
  p.out_scale = static_cast<float>(scale);
  p.dropout = dropout_params(dropout_p, seed, query, op);
  check_launch(softmax_bwd(p, current_stream(query.device())), op);
  // dV = Pd^T dO: [B, H, Lk, Lq] @ [B, H, Lq, Dv];  dQ = dS K: [B, H, Lq, Lk] @ [B, H, Lk, D];
  // dK = dS^T Q: [B, H, Lk, Lq] @ [B, H, Lq, D]   (dS already carries the softmax scale)
  at::Tensor grad_value = at::matmul((dropout_p > 0.0 ? dropped : probs).transpose(-2, -1), grad_out);
  at::Tensor grad_query = at::matmul(grad_scores, key);
  at::Tensor grad_key = at::matmul(grad_scores.transpose(-2, -1), query);
  return {grad_query, grad_key, grad_value, grad_scores};
}

// The stride of dim `d` as the fused kernel uses it: a size-1 dim is only ever indexed at 0, so
// its stride (which torch leaves arbitrary) does not matter and counts as 0.
int64_t used_stride(const at::Tensor& t, int64_t d) { return t.size(d) == 1 ? 0 : t.stride(d); }

// A tensor the fused kernel can read: last dim contiguous, other strides multiples of 8 elements,
// 16-byte aligned; a fresh contiguous copy otherwise (clone, not contiguous(): a tensor torch
// already calls contiguous may still be misaligned, e.g. a view at an odd storage offset).
at::Tensor fusable(const at::Tensor& t) {
  const bool ok = t.stride(3) == 1 && used_stride(t, 0) % 8 == 0 && used_stride(t, 1) % 8 == 0 &&
                  used_stride(t, 2) % 8 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Compute capability (major) of `device`: the fused kernel needs 8.0+ (bf16 WMMA);
// on older GPUs it is compiled as a trap, so it must never be launched there.
int cc_major(int device) {
  static std::array<std::atomic<int64_t>, 64> cache;
  return static_cast<int>(cached_property(cache, device, "compute_capability", device_cc_major));
}

// Why the fused kernel cannot serve `p` on `device` ("" = it can).
const char* fused_reason(const FusedMhaFwdParams& p, int device) {
  if (cc_major(device) < 8) return "the fused kernel needs compute capability 8.0 or newer";
  return fused_mha_fwd_unsupported(p, max_smem_per_block(device));
}

// Points the fused kernel's output at `out`, whose dims bd / hd / ld are the batch, head and row dims.
void set_out(FusedMhaFwdParams& p, const at::Tensor& out, int bd, int hd, int ld) {
  p.out = out.data_ptr();
  p.out_stride_b = used_stride(out, bd);
  p.out_stride_h = used_stride(out, hd);
  p.out_stride_l = out.stride(ld);
}

// Params of the fused kernel for these inputs; `q`, `k`, `v`, `mask` keep the tensors it reads alive.
FusedMhaFwdParams fused_params(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                               const OptTensor& attn_mask, bool is_causal, double scale, const char* op,
                               at::Tensor* q, at::Tensor* k, at::Tensor* v, at::Tensor* mask) {
  FusedMhaFwdParams p;
  fill_attention_params(p, query, key, attn_mask, is_causal, scale, op, mask);
  p.head_dim = value.size(3) == query.size(3) ? static_cast<int>(query.size(3)) : -1;
  *q = fusable(query);
  *k = fusable(key);
  *v = fusable(value);
  p.q = q->data_ptr();
  p.q_stride_b = used_stride(*q, 0);
  p.q_stride_h = used_stride(*q, 1);
  p.q_stride_l = used_stride(*q, 2);
  p.k = k->data_ptr();
  p.k_stride_b = used_stride(*k, 0);
  p.k_stride_h = used_stride(*k, 1);
  p.k_stride_l = used_stride(*k, 2);
  p.v = v->data_ptr();
  p.v_stride_b = used_stride(*v, 0);
  p.v_stride_h = used_stride(*v, 1);
  p.v_stride_l = used_stride(*v, 2);
  return p;
}

// Inference forward: the fused tensor-core kernel when it can serve the call on this device,
// otherwise the unfused path (same semantics; nothing is saved for backward either way).
at::Tensor fused_attention_fwd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                               const OptTensor& attn_mask, bool is_causal, double scale) {
  const char* op = "fused_attention_fwd";
  check_qkv(query, key, value, op);
  TORCH_CHECK(scale > 0.0, "fastbert_cuda::", op, ": scale must be > 0, got ", scale);
  const DeviceGuard guard(query.device());
  at::Tensor q, k, v, mask;
  FusedMhaFwdParams p = fused_params(query, key, value, attn_mask, is_causal, scale, op, &q, &k, &v, &mask);
  // Checked with p.out unset (null passes the alignment check): a fresh allocation is aligned.
  const char* reason = fused_reason(p, query.get_device());
  if (reason[0] != '\0') {
    return std::get<0>(attention_fwd(query, key, value, attn_mask, 0.0, is_causal, scale));
  }
  at::Tensor out = at::empty({p.batch, p.heads, p.q_len, value.size(3)}, query.options());
  set_out(p, out, 0, 1, 2);
  check_launch(fused_mha_fwd(p, current_stream(query.device())), op);
  return out;
}

// The varlen fused kernel's params: q (total_q, H, D), k / v (total_k, H, D) packed, the sequences
// given by cu_seqlens_q / _k ((N + 1,) int32); q_len / k_len the longest lengths.
FusedMhaFwdParams fused_varlen_params(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                      const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                      int64_t max_seqlen_q, int64_t max_seqlen_k, bool is_causal, double scale,
                                      const char* op, at::Tensor* q, at::Tensor* k, at::Tensor* v) {
  check_cuda(q_in, op, "q");
  check_dim(q_in, 3, op, "q");
  check_like(k_in, q_in, op, "k", "q");
  check_like(v_in, q_in, op, "v", "q");
  check_dim(k_in, 3, op, "k");
  check_dim(v_in, 3, op, "v");
  TORCH_CHECK(k_in.size(1) == q_in.size(1) && k_in.size(2) == q_in.size(2) && v_in.sizes() == k_in.sizes(),
              "fastbert_cuda::", op, ": q ", q_in.sizes(), ", k ", k_in.sizes(), " and v ", v_in.sizes(),
              " must be (total, H, D) with equal H and D, k and v of one shape");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{cu_seqlens_q, "cu_seqlens_q"},
                                {cu_seqlens_k, "cu_seqlens_k"}}) {
    check_cuda(t, op, name);
    TORCH_CHECK(t.device() == q_in.device() && t.scalar_type() == at::kInt && t.dim() == 1 && t.numel() >= 2 &&
                    t.is_contiguous(),
                "fastbert_cuda::", op, ": ", name, " must be a contiguous 1-D int32 tensor of at least 2 "
                "entries on q's device, got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
  }
  TORCH_CHECK(cu_seqlens_k.numel() == cu_seqlens_q.numel(), "fastbert_cuda::", op,
              ": cu_seqlens_q and cu_seqlens_k must have the same length");
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, "fastbert_cuda::", op, ": max_seqlen_q / _k must be >= 0");
  FusedMhaFwdParams p;
  p.dtype = dtype_of(q_in, op, "q");
  p.batch = cu_seqlens_q.numel() - 1;
  p.heads = q_in.size(1);
  p.q_len = max_seqlen_q;
  p.k_len = max_seqlen_k;
  p.head_dim = static_cast<int>(q_in.size(2));
  p.scale = static_cast<float>(scale);
  p.causal = is_causal;
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  // (total, H, D) as the kernel's [B, H, L, D] with a batch stride of 0 (the offsets come from cu_seqlens)
  *q = fusable(q_in.unsqueeze(0)).squeeze(0);
  *k = fusable(k_in.unsqueeze(0)).squeeze(0);
  *v = fusable(v_in.unsqueeze(0)).squeeze(0);
  // the strides fusable() checked: a size-1 dim's (never used, maybe not a multiple of 8) as 0
  p.q = q->data_ptr();
  p.q_stride_h = used_stride(*q, 1);
  p.q_stride_l = used_stride(*q, 0);
  p.k = k->data_ptr();
  p.k_stride_h = used_stride(*k, 1);
  p.k_stride_l = used_stride(*k, 0);
  p.v = v->data_ptr();
  p.v_stride_h = used_stride(*v, 1);
  p.v_stride_l = used_stride(*v, 0);
  return p;
}

// Padding-free inference forward (ByteTransformer's fused MHA): the fused tensor-core kernel over
// packed sequences. Refuses (with the reason) what the kernel cannot serve on this device; the
// Python dispatch (_varlen_cuda_reasons) checks the same device limits (compute capability, shared
// memory) before calling, and fusable() copies inputs whose layout the kernel cannot read.
at::Tensor fused_varlen_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                      int64_t max_seqlen_q, int64_t max_seqlen_k, bool is_causal, double scale) {
  const char* op = "fused_varlen_attention_fwd";
  TORCH_CHECK(scale > 0.0, "fastbert_cuda::", op, ": scale must be > 0, got ", scale);
  const DeviceGuard guard(q.device());
  at::Tensor qc, kc, vc;
  FusedMhaFwdParams p = fused_varlen_params(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            is_causal, scale, op, &qc, &kc, &vc);
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.size(0) == 0 || p.batch == 0 || p.q_len == 0) return out.zero_();
  const char* reason = fused_reason(p, q.get_device());
  TORCH_CHECK(reason[0] == '\0', "fastbert_cuda::", op, ": the fused kernel cannot serve this call: ", reason);
  p.out = out.data_ptr();
  p.out_stride_h = out.stride(1);
  p.out_stride_l = out.stride(0);
  check_launch(fused_mha_fwd(p, current_stream(q.device())), op);
  return out;
}

// Why fused_varlen_attention_fwd would refuse these inputs on their device ("" = it runs).
std::string fused_varlen_attention_unsupported(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                               int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const char* op = "fused_varlen_attention_unsupported";
  const DeviceGuard guard(q.device());
  at::Tensor qc, kc, vc;
  FusedMhaFwdParams p = fused_varlen_params(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            false, 1.0, op, &qc, &kc, &vc);
  if (q.size(0) == 0 || p.batch == 0 || p.q_len == 0) return "";  // nothing to compute: zeros
  p.out = qc.data_ptr();  // alignment stand-in: the output is a fresh (aligned) allocation
  p.out_stride_h = q.size(2);
  p.out_stride_l = q.size(1) * q.size(2);
  return fused_reason(p, q.get_device());
}

// Why fused_attention_fwd would take the unfused path for these inputs ("" = it runs fused).
std::string fused_attention_unsupported(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                        const OptTensor& attn_mask) {
  const char* op = "fused_attention_unsupported";
  check_qkv(query, key, value, op);
  const DeviceGuard guard(query.device());
  at::Tensor q, k, v, mask;
  FusedMhaFwdParams p = fused_params(query, key, value, attn_mask, false, 1.0, op, &q, &k, &v, &mask);
  // alignment stand-in: the real output is a fresh (aligned) contiguous allocation
  p.out = q.data_ptr();
  p.out_stride_b = p.heads * p.q_len * value.size(3);
  p.out_stride_h = p.q_len * value.size(3);
  p.out_stride_l = value.size(3);
  return fused_reason(p, query.get_device());
}

// keep[e] for the elements of a contiguous tensor of `shape` under the seed of a forward op.
at::Tensor dropout_mask(const at::Tensor& seed, at::IntArrayRef shape, double p) {
  const char* op = "dropout_mask";
  check_cuda(seed, op, "seed");
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1, "fastbert_cuda::", op,
              ": seed must be a 1-element int64 tensor, got ", seed.scalar_type(), " of shape ", seed.sizes());
  check_dropout(p, op);
  const DeviceGuard guard(seed.device());
  at::Tensor keep = at::empty(shape, seed.options().dtype(at::kBool));
  DropoutMaskParams params;
  params.numel = keep.numel();
  params.keep = keep.data_ptr<bool>();
  params.dropout.p = static_cast<float>(p);
  params.dropout.seed = seed.data_ptr<int64_t>();
  check_launch(fastbert::dropout_mask(params, num_sms(seed.get_device()), current_stream(seed.device())), op);
  return keep;
}

at::Tensor dropout_mask_meta(const at::Tensor& seed, at::IntArrayRef shape, double /*p*/) {
  return at::empty(shape, seed.options().dtype(at::kBool));
}

}  // namespace ops
}  // namespace fastbert

namespace {

void define_schemas(torch::Library& m) {
  const std::vector<at::Tag> seeded = {at::Tag::nondeterministic_seeded};
  m.def("layer_norm_fwd(Tensor input, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor grad_out, Tensor input, Tensor? weight, Tensor mean, Tensor rstd, "
        "bool need_weight_grad, bool need_bias_grad) -> (Tensor, Tensor, Tensor)");
  m.def("add_layer_norm_fwd(Tensor input, Tensor residual, Tensor? weight, Tensor? bias, "
        "Tensor? input_bias, float eps, float dropout_p) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        seeded);
  m.def("add_layer_norm_bwd(Tensor grad_out, Tensor? grad_sum, Tensor sum, Tensor? weight, Tensor mean, "
        "Tensor rstd, Tensor seed, float dropout_p, bool need_weight_grad, bool need_bias_grad, "
        "bool need_input_bias_grad, ScalarType? input_dtype=None) -> (Tensor, Tensor, Tensor, Tensor, "
        "Tensor)");
  m.def("bias_gelu_fwd(Tensor input, Tensor? bias, str approximate) -> Tensor");
  m.def("bias_gelu_bwd(Tensor grad_out, Tensor input, Tensor? bias, str approximate, bool need_bias_grad) "
        "-> (Tensor, Tensor)");
  m.def("geglu_fwd(Tensor input, Tensor? gate, str approximate) -> Tensor");
  m.def("geglu_bwd(Tensor grad_out, Tensor input, Tensor? gate, str approximate) -> (Tensor, Tensor)");
  m.def("attention_fwd(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float dropout_p, "
        "bool is_causal, float scale) -> (Tensor, Tensor, Tensor)",
        seeded);
  m.def("attention_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor probs, Tensor seed, "
        "float dropout_p, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("fused_attention_fwd(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, bool is_causal, "
        "float scale) -> Tensor");
  m.def("fused_attention_unsupported(Tensor query, Tensor key, Tensor value, Tensor? attn_mask) -> str");
  m.def("fused_varlen_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "int max_seqlen_q, int max_seqlen_k, bool is_causal, float scale) -> Tensor");
  m.def("fused_varlen_attention_unsupported(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, "
        "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k) -> str");
  m.def("dropout_mask(Tensor seed, int[] shape, float p) -> Tensor");
}

void impl_kernels(torch::Library& m) {
  m.impl("layer_norm_fwd", &fastbert::ops::layer_norm_fwd);
  m.impl("layer_norm_bwd", &fastbert::ops::layer_norm_bwd);
  m.impl("add_layer_norm_fwd", &fastbert::ops::add_layer_norm_fwd);
  m.impl("add_layer_norm_bwd", &fastbert::ops::add_layer_norm_bwd);
  m.impl("bias_gelu_fwd", &fastbert::ops::bias_gelu_fwd);
  m.impl("bias_gelu_bwd", &fastbert::ops::bias_gelu_bwd);
  m.impl("geglu_fwd", &fastbert::ops::geglu_fwd);
  m.impl("geglu_bwd", &fastbert::ops::geglu_bwd);
  m.impl("attention_fwd", &fastbert::ops::attention_fwd);
  m.impl("attention_bwd", &fastbert::ops::attention_bwd);
  m.impl("fused_attention_fwd", &fastbert::ops::fused_attention_fwd);
  m.impl("fused_attention_unsupported", &fastbert::ops::fused_attention_unsupported);
  m.impl("fused_varlen_attention_fwd", &fastbert::ops::fused_varlen_attention_fwd);
  m.impl("fused_varlen_attention_unsupported", &fastbert::ops::fused_varlen_attention_unsupported);
  m.impl("dropout_mask", &fastbert::ops::dropout_mask);
}

}  // namespace

#ifdef FASTBERT_EMULATE
// tests/cuda_emu/build.py: the same schemas and kernels, emulated on CPU tensors.
TORCH_LIBRARY(fastbert_emu, m) { define_schemas(m); }
TORCH_LIBRARY_IMPL(fastbert_emu, CPU, m) { impl_kernels(m); }
#else
TORCH_LIBRARY(fastbert_cuda, m) { define_schemas(m); }
TORCH_LIBRARY_IMPL(fastbert_cuda, CUDA, m) { impl_kernels(m); }
TORCH_LIBRARY_IMPL(fastbert_cuda, Meta, m) {
  m.impl("dropout_mask", &fastbert::ops::dropout_mask_meta);
}
#endif
