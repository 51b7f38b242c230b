"""LayerNorm and residual + bias + dropout + LayerNorm: public functions, checks and dispatch
(ops ``"layer_norm"`` and ``"add_layer_norm"``)."""
from __future__ import annotations

import math
import numbers
import operator
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import reference
from .._autocast import autocast_dtype, cast, disabled, layer_norm_dtype
from .._rng import dropout_seed, seed_like
from .._validation import check_bool, check_dropout, check_same, check_tensor, type_name
from .._library import custom_op, first_order_only
from ..backends import cuda_ops, register, register_cuda_family, select

__all__ = ["layer_norm", "add_layer_norm"]


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float, got {type_name(eps)}")
    if not 0.0 <= float(eps) < math.inf:
        raise ValueError(f"eps must be >= 0 and finite, got {eps}")
    return float(eps)


def check_normalized_shape(normalized_shape) -> Tuple[int, ...]:
    """An int or a sequence of ints (a torch.Size, a list, ...) -> a tuple of ints."""
    if type(normalized_shape) in (tuple, torch.Size) and all(type(d) is int for d in normalized_shape):
        return tuple(normalized_shape)  # the common case, checked cheaply
    if isinstance(normalized_shape, (str, bytes, bool)):
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got "
                        f"{type_name(normalized_shape)}")
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    try:
        dims = list(normalized_shape)
    except TypeError:
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got "
                        f"{type_name(normalized_shape)}") from None
    out = []
    for d in dims:
        if isinstance(d, bool):
            raise TypeError(f"normalized_shape must hold ints, got {normalized_shape!r}")
        try:
            out.append(operator.index(d))
        except TypeError:
            raise TypeError(f"normalized_shape must hold ints, got {normalized_shape!r}") from None
    return tuple(out)


def _check_param(name: str, p, shape: Tuple[int, ...], ref: Tensor) -> None:
    if p is None:
        return
    check_tensor(name, p)
    check_same("input", ref, name, p, dtype=False)
    if tuple(p.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(p.shape)}")


def layer_norm(
    input: Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """LayerNorm over the trailing ``normalized_shape`` dims, as ``torch.nn.functional.layer_norm``.

    Shapes: input (..., *normalized_shape); weight, bias: normalized_shape or None -> input's shape.
    Statistics are computed in fp32 (fp64 for fp64 input). The output has input's dtype, except
    under ``torch.autocast`` on CUDA, where, as ``F.layer_norm`` there, it is computed from the
    input, weight and bias in fp32 and returned in fp32 (the Triton kernels read a 16-bit input as
    it is, without a cast pass; its gradient comes back in its dtype).
    """
    out_dtype = None
    if autocast_dtype(input) is not None:
        dtype = layer_norm_dtype(input, input.dtype)
        if dtype == torch.float32:  # CUDA: computed and returned in fp32, as autocast runs
            weight, bias = cast(weight, dtype), cast(bias, dtype)  # F.layer_norm there; the input
            out_dtype = dtype if isinstance(input, Tensor) and input.dtype != dtype else None
        with disabled(input):  # is read in its own dtype (no cast pass) where the backend can
            return _layer_norm(input, normalized_shape, weight, bias, eps, backend, out_dtype)
    return _layer_norm(input, normalized_shape, weight, bias, eps, backend, out_dtype)


def _layer_norm(input, normalized_shape, weight, bias, eps, backend, out_dtype):
    """layer_norm's checks and dispatch; ``out_dtype`` (fp32 under CUDA autocast, else None: the
    input's dtype) is the dtype the output is computed into and returned in."""
    check_tensor("input", input)
    normalized_shape = check_normalized_shape(normalized_shape)
    n = len(normalized_shape)
    if n == 0 or n > input.dim() or tuple(input.shape[input.dim() - n:]) != normalized_shape:
        raise ValueError(f"normalized_shape {normalized_shape} must match the trailing dims of "
                         f"input of shape {tuple(input.shape)}")
    _check_param("weight", weight, normalized_shape, input)
    _check_param("bias", bias, normalized_shape, input)
    eps = _check_eps(eps)
    impl = select("layer_norm", backend, input.device, input=input, normalized_shape=normalized_shape,
                  weight=weight, bias=bias, eps=eps, out_dtype=out_dtype)
    return impl.fn(input, normalized_shape, weight, bias, eps, out_dtype=out_dtype)


def add_layer_norm(
    input: Tensor,
    residual: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float = 1e-5,
    *,
    input_bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    return_residual: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """``layer_norm(dropout(input + input_bias) + residual)`` over the last dim, fused.

    This is BERT's output sublayer after the dense matmul (``input`` is the matmul output without
    its bias, ``input_bias`` that bias).

    Shapes: input, residual (..., N); weight, bias, input_bias (N,) or None -> (..., N).
    With ``return_residual=True`` returns ``(out, pre_norm_sum)``, the sum being what a pre-LN model
    carries on as its residual stream.

    input and residual may differ in dtype (a Linear's bf16 output and an fp32 residual stream, as
    under mixed precision): the sum and both results take their promoted dtype, as torch's ``+``
    gives, and each gradient comes back in its input's dtype. The Triton kernels read each tensor
    in its own dtype (no cast pass); so do the CUDA kernels for a 16-bit input with an fp32
    residual (and fp32 parameters), and that backend casts any other pair to the promoted dtype.

    Under ``torch.autocast`` input_bias is cast to the sum's dtype (it is the Linear's bias), and the
    LayerNorm is computed and returned in fp32 on CUDA (as ``F.layer_norm`` under autocast there),
    in the promoted dtype on CPU; ``pre_norm_sum`` is in the promoted dtype.

    The sum is normalised as computed in fp32 (the reference and Triton); the CUDA kernels, which
    store it in the output dtype for their backward, normalise that rounded sum (up to half an ulp
    apart). Where the sum overflows a 16-bit dtype (``pre_norm_sum`` holds inf) the rows differ:
    NaN on CUDA, as ``F.layer_norm(input + residual)`` gives, finite from the fp32 sum elsewhere.
    """
    if autocast_dtype(input) is not None and isinstance(residual, Tensor):
        sum_dtype = torch.promote_types(input.dtype, residual.dtype)
        dtype = layer_norm_dtype(input, sum_dtype)
        if dtype == torch.float32:
            weight, bias = cast(weight, dtype), cast(bias, dtype)
        if dtype != sum_dtype:  # CUDA, 16-bit input and residual: normalised in fp32
            input, residual = cast(input, dtype), cast(residual, dtype)
        with disabled(input):
            result = add_layer_norm(input, residual, weight, bias, eps,
                                    input_bias=cast(input_bias, dtype), dropout_p=dropout_p,
                                    return_residual=return_residual, backend=backend)
        if return_residual is True and result[1].dtype != sum_dtype:  # computed in fp32 (CUDA)
            result = (result[0], result[1].to(sum_dtype))
        return result
    check_tensor("input", input)
    check_tensor("residual", residual)
    check_same("input", input, "residual", residual, dtype=False)
    if residual.shape != input.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must have the shape of input "
                         f"{tuple(input.shape)}")
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dim")
    shape = (input.shape[-1],)
    _check_param("weight", weight, shape, input)
    _check_param("bias", bias, shape, input)
    _check_param("input_bias", input_bias, shape, input)
    eps = _check_eps(eps)
    dropout_p = check_dropout(dropout_p)
    return_residual = check_bool("return_residual", return_residual)
    impl = select("add_layer_norm", backend, input.device, input=input, residual=residual,
                  weight=weight, bias=bias, eps=eps, input_bias=input_bias, dropout_p=dropout_p,
                  return_residual=return_residual)
    return impl.fn(input, residual, weight, bias, eps, input_bias, dropout_p, return_residual)


@register("layer_norm", "torch")
def _layer_norm_torch(input, normalized_shape, weight, bias, eps, out_dtype=None):
    if out_dtype is not None:
        input = input.to(out_dtype)
    # contiguous, as F.layer_norm's output (the reference's elementwise ops keep a permuted input's
    # layout, in which a .view of the result can fail)
    return reference.layer_norm(input, normalized_shape, weight, bias, eps).contiguous()


@register("add_layer_norm", "torch")
def _add_layer_norm_torch(input, residual, weight, bias, eps, input_bias, dropout_p, return_residual):
    out = reference.add_layer_norm(input, residual, weight, bias, eps, input_bias=input_bias,
                                   dropout_p=dropout_p, return_residual=return_residual)
    if return_residual:
        return out[0].contiguous(), out[1]
    return out.contiguous()  # as F.layer_norm's


# ----------------------------------------------------------------------------------------------
# Triton backend (kernels/layer_norm.py). Registered as torch.library custom ops with fake
# (meta) implementations and autograd, so torch.compile(fullgraph=True) sees two opaque ops per
# call (forward, backward). The kernels module is imported inside the ops, so that
# ``import fastbert`` does not import triton.
# ----------------------------------------------------------------------------------------------
def _float64_reasons(**tensors) -> List[str]:
    return [f"{name} is float64; the Triton kernels take float16, bfloat16 or float32"
            for name, t in tensors.items() if t is not None and t.dtype == torch.float64]


def _layer_norm_triton_reasons(*, input, weight=None, bias=None, **_) -> List[str]:
    return _float64_reasons(input=input, weight=weight, bias=bias)


def _add_layer_norm_triton_reasons(*, input, residual, weight=None, bias=None, input_bias=None,
                                   **_) -> List[str]:
    return _float64_reasons(input=input, residual=residual, weight=weight, bias=bias,
                            input_bias=input_bias)


def _dtype_or_none(t: Optional[Tensor]):
    return None if t is None else t.dtype


def _grad_like(flag: bool, p: Optional[Tensor], ref: Tensor) -> Tensor:
    """Fake gradient of parameter ``p``: its shape and dtype, or an empty placeholder."""
    if flag and p is not None:
        return p.new_empty(p.shape)
    return ref.new_empty((0,))


@custom_op("fastbert::layer_norm_fwd")
def _layer_norm_fwd_op(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       norm_ndim: int, eps: float,
                       out_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (out in ``out_dtype`` (None: input's), mean [M] fp32, rstd [M] fp32)."""
    from ..kernels.layer_norm import layer_norm_fwd

    out, _, mean, rstd = layer_norm_fwd(input, weight, bias, eps, norm_ndim=norm_ndim,
                                        out_dtype=out_dtype)
    return out, mean, rstd


@_layer_norm_fwd_op.register_fake
def _(input, weight, bias, norm_ndim, eps, out_dtype):
    m = math.prod(input.shape[:input.dim() - norm_ndim])
    stats = input.new_empty((m,), dtype=torch.float32)
    return input.new_empty(input.shape, dtype=out_dtype or input.dtype), stats, torch.empty_like(stats)


@custom_op("fastbert::layer_norm_bwd")
def _layer_norm_bwd_op(grad_out: Tensor, input: Tensor, weight: Optional[Tensor],
                       bias: Optional[Tensor], mean: Tensor, rstd: Tensor, norm_ndim: int,
                       need_dweight: bool, need_dbias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (dinput, dweight, dbias); a gradient not asked for is an empty placeholder. ``bias`` is
    only read for its dtype (the kernel does not need it)."""
    from ..kernels.layer_norm import layer_norm_bwd

    need_dweight = need_dweight and weight is not None
    need_dbias = need_dbias and bias is not None
    dx, _, dw, db, _ = layer_norm_bwd(
        grad_out, input, weight, mean, rstd, norm_ndim=norm_ndim, need_dweight=need_dweight,
        need_dbias=need_dbias, param_dtypes=(_dtype_or_none(weight), _dtype_or_none(bias), None))
    empty = input.new_empty((0,))
    return dx, (dw if dw is not None else empty), (db if db is not None else empty.clone())


@_layer_norm_bwd_op.register_fake
def _(grad_out, input, weight, bias, mean, rstd, norm_ndim, need_dweight, need_dbias):
    return (input.new_empty(input.shape), _grad_like(need_dweight, weight, input),
            _grad_like(need_dbias, bias, input))


def _layer_norm_setup_context(ctx, inputs, output):
    input, weight, bias, norm_ndim, eps, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(input, weight, bias, mean, rstd)
    ctx.norm_ndim = norm_ndim
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero gradients for the statistics


def _layer_norm_backward(ctx, grad_out, _grad_mean, _grad_rstd):
    if grad_out is None:
        return (None,) * len(ctx.needs_input_grad)
    input, weight, bias, mean, rstd = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    dx, dw, db = _layer_norm_bwd_op(grad_out, input, weight, bias, mean, rstd,
                                                   ctx.norm_ndim, need_dw, need_db)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None, None, None,
            None)


_layer_norm_fwd_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup_context)


@custom_op("fastbert::add_layer_norm_fwd", seeded=True)
def _add_layer_norm_fwd_op(input: Tensor, residual: Tensor, weight: Optional[Tensor],
                           bias: Optional[Tensor], input_bias: Optional[Tensor], eps: float,
                           dropout_p: float, return_residual: bool
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (out, pre_norm_sum (empty unless return_residual), mean, rstd, dropout seed: int64 (1,)
    on input's device, drawn there (see fastbert._rng), or (0,) without dropout)."""
    from ..kernels.layer_norm import layer_norm_fwd

    seed = dropout_seed(dropout_p, input.device)
    out, s, mean, rstd = layer_norm_fwd(input, weight, bias, eps, residual=residual,
                                        input_bias=input_bias, dropout_p=dropout_p, seed=seed,
                                        store_sum=return_residual)
    if s is None:  # in the output's (promoted) dtype, as the fake says
        s = out.new_empty((0,))
    return out, s, mean, rstd, seed


@_add_layer_norm_fwd_op.register_fake
def _(input, residual, weight, bias, input_bias, eps, dropout_p, return_residual):
    m = math.prod(input.shape[:-1])
    stats = input.new_empty((m,), dtype=torch.float32)
    dtype = torch.promote_types(input.dtype, residual.dtype)
    s = input.new_empty(input.shape if return_residual else (0,), dtype=dtype)
    return (input.new_empty(input.shape, dtype=dtype), s, stats, torch.empty_like(stats),
            seed_like(dropout_p, input.device))


@custom_op("fastbert::add_layer_norm_bwd")
def _add_layer_norm_bwd_op(grad_out: Tensor, grad_sum: Optional[Tensor], input: Tensor,
                           residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                           input_bias: Optional[Tensor], mean: Tensor, rstd: Tensor, seed: Tensor,
                           dropout_p: float, need_dinput: bool, need_dweight: bool,
                           need_dbias: bool, need_dinput_bias: bool
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dsum, dinput, dweight, dbias, dinput_bias). dsum is the gradient of the pre-norm sum,
    which is the residual's (in its dtype); dinput is an empty placeholder when it equals dsum (no
    dropout, input in the residual's dtype) and so is every gradient not asked for."""
    from ..kernels.layer_norm import layer_norm_bwd

    need_dweight = need_dweight and weight is not None
    need_dbias = need_dbias and bias is not None
    need_dinput_bias = need_dinput_bias and input_bias is not None
    ds, dx, dw, db, dxb = layer_norm_bwd(
        grad_out, input, weight, mean, rstd, residual=residual, input_bias=input_bias,
        dsum=grad_sum, dropout_p=dropout_p, seed=seed, need_dinput=need_dinput,
        need_dweight=need_dweight, need_dbias=need_dbias, need_dinput_bias=need_dinput_bias,
        param_dtypes=(_dtype_or_none(weight), _dtype_or_none(bias), _dtype_or_none(input_bias)))
    outs = [ds]
    for t in (dx if need_dinput else None, dw, db, dxb):
        outs.append(t if t is not None else input.new_empty((0,)))
    return tuple(outs)


@_add_layer_norm_bwd_op.register_fake
def _(grad_out, grad_sum, input, residual, weight, bias, input_bias, mean, rstd, seed, dropout_p,
      need_dinput, need_dweight, need_dbias, need_dinput_bias):
    dx = input.new_empty(input.shape if need_dinput and _dinput_stored(input, residual, dropout_p)
                         else (0,))
    return (residual.new_empty(input.shape), dx, _grad_like(need_dweight, weight, input),
            _grad_like(need_dbias, bias, input), _grad_like(need_dinput_bias, input_bias, input))


def _dinput_stored(input: Tensor, residual: Tensor, dropout_p: float) -> bool:
    """Whether the backward kernel writes the input's gradient apart from the sum's (the
    residual's): under dropout, or in another dtype."""
    return dropout_p > 0.0 or input.dtype != residual.dtype


def _sum_without_grad(ctx, s: Tensor) -> None:
    """The pre-norm sum depends on input, residual and input_bias only: when none of them needs a
    gradient it is returned without one (as torch's ``input + residual``), even if the weight does."""
    if not any(ctx.needs_input_grad[i] for i in (0, 1, 4)):
        ctx.mark_non_differentiable(s)


def _add_layer_norm_setup_context(ctx, inputs, output):
    input, residual, weight, bias, input_bias, eps, dropout_p, return_residual = inputs
    _, _, mean, rstd, seed = output
    ctx.save_for_backward(input, residual, weight, bias, input_bias, mean, rstd, seed)
    ctx.dropout_p = dropout_p
    ctx.return_residual = return_residual
    ctx.mark_non_differentiable(mean, rstd, seed)
    _sum_without_grad(ctx, output[1])
    # An unused output's gradient arrives as None instead of a materialised zero tensor that the
    # backward kernel would have to read.
    ctx.set_materialize_grads(False)


def _add_layer_norm_backward(ctx, grad_out, grad_sum, _grad_mean, _grad_rstd, _grad_seed):
    input, residual, weight, bias, input_bias, mean, rstd, seed = ctx.saved_tensors
    need_dx, need_dr, need_dw, need_db, need_dxb = ctx.needs_input_grad[:5]
    if not ctx.return_residual:
        grad_sum = None  # the empty placeholder output carries no gradient
    if grad_out is None:  # only the pre-norm sum was used: a one-element stride-0 zero gradient
        grad_out = input.new_zeros(()).expand(input.shape)
    p = ctx.dropout_p
    stored = _dinput_stored(input, residual, p)
    ds, dx, dw, db, dxb = _add_layer_norm_bwd_op(
        grad_out, grad_sum, input, residual, weight, bias, input_bias, mean, rstd, seed, p,
        need_dx and stored, need_dw, need_db, need_dxb)
    if not stored:
        dx = ds  # no dropout, one dtype: the input's gradient is the sum's, as the residual's
    return (dx if need_dx else None, ds if need_dr else None, dw if need_dw else None,
            db if need_db else None, dxb if need_dxb else None, None, None, None)


_add_layer_norm_fwd_op.register_autograd(
    _add_layer_norm_backward, setup_context=_add_layer_norm_setup_context)


@register("layer_norm", "triton", reasons=_layer_norm_triton_reasons)
def _layer_norm_triton(input, normalized_shape, weight, bias, eps, out_dtype=None):
    out, _, _ = _layer_norm_fwd_op(input, weight, bias, len(normalized_shape), eps, out_dtype)
    return out


@register("add_layer_norm", "triton", reasons=_add_layer_norm_triton_reasons)
def _add_layer_norm_triton(input, residual, weight, bias, eps, input_bias, dropout_p,
                           return_residual):
    out, s, _, _, _ = _add_layer_norm_fwd_op(input, residual, weight, bias,
                                                            input_bias, eps, dropout_p,
                                                            return_residual)
    return (out, s) if return_residual else out


# ----------------------------------------------------------------------------------------------
# CUDA backend (csrc/layer_norm, extension fastbert._C). The C++ extension registers the schemas
# and CUDA kernels as torch.ops.fastbert_cuda.{layer_norm,add_layer_norm}_{fwd,bwd}; the fake
# implementations and the autograd formulas are registered here, when the extension is first
# used (it is loaded lazily: ``import fastbert`` never needs it; also from inside torch.compile,
# see backends.cuda_ops). Dropout: the C++ forward draws its seed on the device from
# that device's default CUDA generator (as fastbert._rng does: graph-safe, reproduced by
# torch.manual_seed, never read on the host) and returns it as an int64 [1] CUDA tensor, which
# backward takes back.
# ----------------------------------------------------------------------------------------------
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _cuda_reasons(dtype: torch.dtype, what: str, **params: Optional[Tensor]) -> List[str]:
    reasons = []
    if dtype not in _CUDA_DTYPES:
        reasons.append(f"{what} dtype {dtype} is not supported by the CUDA kernels "
                       "(float16, bfloat16, float32)")
    reasons += [f"{name} dtype {p.dtype} differs from {what} dtype {dtype} (the CUDA kernels "
                "need them equal)" for name, p in params.items() if p is not None and p.dtype != dtype]
    return reasons


# csrc/common.h kMaxRowLength: the CUDA kernels index within a row with 32-bit counters
_CUDA_MAX_ROW = 2 ** 31 - 8192


def _row_reasons(cols: int) -> List[str]:
    if cols > _CUDA_MAX_ROW:
        return [f"rows of {cols} elements exceed the CUDA kernels' limit of {_CUDA_MAX_ROW}"]
    return []


def _layer_norm_cuda_reasons(*, input, normalized_shape=(), weight=None, bias=None, out_dtype=None,
                             **_) -> List[str]:
    rows = _row_reasons(math.prod(normalized_shape))
    if out_dtype is not None:  # the input is cast to it first (see _layer_norm_cuda)
        return rows + _cuda_reasons(out_dtype, "input (cast to the output dtype)", weight=weight,
                                    bias=bias)
    return rows + _cuda_reasons(input.dtype, "input", weight=weight, bias=bias)


def _cuda_mixed(input: Tensor, residual: Tensor) -> bool:
    """Whether the CUDA kernels take this input / residual pair as it is (mixed precision: a
    16-bit input with an fp32 residual; the parameters then in fp32)."""
    return residual.dtype == torch.float32 and input.dtype in (torch.float16, torch.bfloat16)


def _add_layer_norm_cuda_reasons(*, input, residual, weight=None, bias=None, input_bias=None,
                                 **_) -> List[str]:
    # Other pairs of two dtypes are cast to the promoted one first (see _add_layer_norm_cuda).
    if residual.dtype == input.dtype:
        what = "input"
    elif _cuda_mixed(input, residual):
        what = "residual"
    else:
        what = "input + residual (promoted)"
    return _row_reasons(input.shape[-1] if input.dim() else 1) + _cuda_reasons(
        torch.promote_types(input.dtype, residual.dtype), what, weight=weight, bias=bias,
        input_bias=input_bias)


def _cuda_ops():
    """torch.ops.fastbert_cuda, with the extension loaded and this family's fakes / autograd registered."""
    return cuda_ops("layer_norm")


def _cuda_grad_like(need: bool, ref: Tensor, n: int) -> Tensor:
    return ref.new_empty((n,) if need else (0,))


def _register_cuda_ops(namespace: str = "fastbert_cuda") -> None:
    # `namespace`: also "fastbert_emu", the CPU-emulated build of the same kernels (tests/cuda_emu).
    lib = namespace + "::"
    ops = getattr(torch.ops, namespace)

    @torch.library.register_fake(lib + "layer_norm_fwd")
    def _(input, weight, bias, eps):
        stats = input.new_empty((input.shape[0],), dtype=torch.float32)
        return input.new_empty(input.shape), stats, torch.empty_like(stats)

    @torch.library.register_fake(lib + "layer_norm_bwd")
    def _(grad_out, input, weight, mean, rstd, need_weight_grad, need_bias_grad):
        n = input.shape[1]
        return (input.new_empty(input.shape),
                _cuda_grad_like(need_weight_grad and weight is not None, input, n),
                _cuda_grad_like(need_bias_grad, input, n))

    @torch.library.register_fake(lib + "add_layer_norm_fwd")
    def _(input, residual, weight, bias, input_bias, eps, dropout_p):
        stats = input.new_empty((input.shape[0],), dtype=torch.float32)
        seed = seed_like(dropout_p, input.device)
        return (residual.new_empty(input.shape), residual.new_empty(input.shape), stats,
                torch.empty_like(stats), seed)

    @torch.library.register_fake(lib + "add_layer_norm_bwd")
    def _(grad_out, grad_sum, sum, weight, mean, rstd, seed, dropout_p, need_weight_grad,
          need_bias_grad, need_input_bias_grad, input_dtype=None):
        n = sum.shape[1]
        in_dtype = sum.dtype if input_dtype is None else input_dtype
        separate = dropout_p > 0.0 or in_dtype != sum.dtype
        return (sum.new_empty(sum.shape if separate else (0,), dtype=in_dtype), sum.new_empty(sum.shape),
                _cuda_grad_like(need_weight_grad and weight is not None, sum, n),
                _cuda_grad_like(need_bias_grad, sum, n), _cuda_grad_like(need_input_bias_grad, sum, n))

    def layer_norm_setup(ctx, inputs, output):
        input, weight, bias, _eps = inputs
        _, mean, rstd = output
        ctx.save_for_backward(input, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)

    def layer_norm_backward(ctx, grad_out, _grad_mean, _grad_rstd):
        if grad_out is None:
            return (None,) * len(ctx.needs_input_grad)
        input, weight, mean, rstd = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx, dw, db = ops.layer_norm_bwd(
            grad_out, input, weight, mean, rstd, need_dw and weight is not None, need_db and ctx.has_bias)
        return dx if need_dx else None, dw if need_dw else None, db if need_db else None, None

    torch.library.register_autograd(lib + "layer_norm_fwd",
                                    first_order_only(lib + "layer_norm_fwd", layer_norm_backward),
                                    setup_context=layer_norm_setup)

    def add_layer_norm_setup(ctx, inputs, output):
        input, _residual, weight, bias, input_bias, _eps, dropout_p = inputs
        _, s, mean, rstd, seed = output
        ctx.save_for_backward(s, weight, mean, rstd, seed)  # x_hat is recomputed from the sum s
        ctx.dropout_p = dropout_p
        ctx.input_dtype = input.dtype if input.dtype != s.dtype else None  # mixed precision
        ctx.has_bias = bias is not None
        ctx.has_input_bias = input_bias is not None
        ctx.mark_non_differentiable(mean, rstd, seed)
        _sum_without_grad(ctx, s)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None

    def add_layer_norm_backward(ctx, grad_out, grad_sum, _grad_mean, _grad_rstd, _grad_seed):
        s, weight, mean, rstd, seed = ctx.saved_tensors
        need_dx, need_dr, need_dw, need_db, need_dxb = ctx.needs_input_grad[:5]
        if grad_out is None and grad_sum is None:
            return (None,) * 7
        if grad_out is None:  # only the pre-norm sum was used
            grad_out = s.new_zeros(()).expand(s.shape)
        dx, dr, dw, db, dxb = ops.add_layer_norm_bwd(
            grad_out, grad_sum, s, weight, mean, rstd, seed, ctx.dropout_p,
            need_dw and weight is not None, need_db and ctx.has_bias, need_dxb and ctx.has_input_bias,
            ctx.input_dtype)
        if ctx.dropout_p == 0.0 and ctx.input_dtype is None:
            dx = dr  # without dropout the input's gradient is the residual's (returned once)
        return (dx if need_dx else None, dr if need_dr else None, dw if need_dw else None,
                db if need_db else None, dxb if need_dxb else None, None, None)

    torch.library.register_autograd(lib + "add_layer_norm_fwd",
                                    first_order_only(lib + "add_layer_norm_fwd", add_layer_norm_backward),
                                    setup_context=add_layer_norm_setup)


register_cuda_family("layer_norm", _register_cuda_ops)


@register("layer_norm", "cuda", reasons=_layer_norm_cuda_reasons)
def _layer_norm_cuda(input, normalized_shape, weight, bias, eps, out_dtype=None):
    ops = _cuda_ops()
    if out_dtype is not None:  # the kernels take one dtype: a 16-bit input under autocast is cast
        input = input.to(out_dtype)
    n = math.prod(normalized_shape)
    rows = math.prod(input.shape[:input.dim() - len(normalized_shape)])
    w = weight.reshape(n) if weight is not None else None
    b = bias.reshape(n) if bias is not None else None
    out, _, _ = ops.layer_norm_fwd(input.reshape(rows, n), w, b, eps)
    return out.view(input.shape)


@register("add_layer_norm", "cuda", reasons=_add_layer_norm_cuda_reasons)
def _add_layer_norm_cuda(input, residual, weight, bias, eps, input_bias, dropout_p, return_residual):
    ops = _cuda_ops()
    if input.dtype != residual.dtype and not _cuda_mixed(input, residual):
        # the kernels take one dtype, or a 16-bit input with an fp32 residual: others are cast
        dtype = torch.promote_types(input.dtype, residual.dtype)
        input, residual = input.to(dtype), residual.to(dtype)
    n = input.shape[-1]
    rows = math.prod(input.shape[:-1])
    out, s, _, _, _ = ops.add_layer_norm_fwd(input.reshape(rows, n), residual.reshape(rows, n), weight,
                                             bias, input_bias, eps, dropout_p)
    out = out.view(input.shape)
    return (out, s.view(input.shape)) if return_residual else out
