"""GELU, bias + GELU and GEGLU: public functions, checks and dispatch (ops ``"gelu"``,
``"bias_gelu"`` and ``"geglu"``)."""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from .._validation import check_same, check_tensor
from .._library import custom_op, first_order_only
from ..backends import cuda_ops, register, register_cuda_family, select

__all__ = ["gelu", "bias_gelu", "geglu"]

APPROXIMATIONS = ("none", "tanh")


def _check_approximate(approximate) -> str:
    if not isinstance(approximate, str):
        raise TypeError(f"approximate must be a str, got {type(approximate).__name__}")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be 'none' (erf) or 'tanh', got {approximate!r}")
    return approximate


def gelu(input: Tensor, approximate: str = "none", *, backend: Optional[str] = None) -> Tensor:
    """GELU, as ``torch.nn.functional.gelu``: exact (erf) or ``approximate="tanh"``. Any shape."""
    check_tensor("input", input)
    approximate = _check_approximate(approximate)
    impl = select("gelu", backend, input.device, input=input, approximate=approximate)
    return impl.fn(input, approximate)


def bias_gelu(input: Tensor, bias: Optional[Tensor], approximate: str = "none", *,
              backend: Optional[str] = None) -> Tensor:
    """``gelu(input + bias)`` fused: BERT's intermediate activation after the dense matmul.

    Shapes: input (..., N), bias (N,) or None -> (..., N). The bias gradient is the column sum.
    """
    check_tensor("input", input)
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dim")
    if bias is not None:
        check_tensor("bias", bias, ndim=(1,))
        check_same("input", input, "bias", bias, dtype=False)
        if bias.shape[0] != input.shape[-1]:
            raise ValueError(f"bias must have shape ({input.shape[-1]},) to match input's last dim, "
                             f"got {tuple(bias.shape)}")
    approximate = _check_approximate(approximate)
    impl = select("bias_gelu", backend, input.device, input=input, bias=bias, approximate=approximate)
    return impl.fn(input, bias, approximate)


def geglu(input: Tensor, gate: Optional[Tensor] = None, approximate: str = "none", *,
          backend: Optional[str] = None) -> Tensor:
    """GEGLU, ``gelu(input) * gate`` fused: the gated MLP activation of ModernBERT, T5 v1.1 and
    GLU-variant transformers. Reads each input once and writes the output once; the backward pass
    recomputes ``gelu`` instead of storing it.

    Shapes:
        - ``gate=None`` (the packed form): input (..., 2N) is one matmul's output holding both
          halves, split as ``input.chunk(2, dim=-1)`` with the *first* half through GELU (as
          ModernBERT and the GLU-variants paper) -> (..., N). Its gradient is one (..., 2N) tensor.
        - ``gate`` given: input and gate (..., N), one shape and dtype -> (..., N).

    ``approximate``: ``"none"`` (erf) or ``"tanh"``, as :func:`torch.nn.functional.gelu`. Any
    strides (the halves of a packed input are read in place). The math is fp32 inside.
    """
    check_tensor("input", input)
    if gate is None:
        if input.dim() == 0 or input.shape[-1] % 2:
            raise ValueError("input must have an even last dim when gate is None (its two halves "
                             f"are the GELU input and the gate), got shape {tuple(input.shape)}")
    else:
        check_tensor("gate", gate)
        check_same("input", input, "gate", gate)
        if gate.shape != input.shape:
            raise ValueError(f"gate must have input's shape {tuple(input.shape)}, got "
                             f"{tuple(gate.shape)}")
    approximate = _check_approximate(approximate)
    impl = select("geglu", backend, input.device, input=input, gate=gate, approximate=approximate)
    return impl.fn(input, gate, approximate)


@register("gelu", "torch")
def _gelu_torch(input, approximate):
    return reference.gelu(input, approximate)


@register("bias_gelu", "torch")
def _bias_gelu_torch(input, bias, approximate):
    return reference.bias_gelu(input, bias, approximate)


@register("geglu", "torch")
def _geglu_torch(input, gate, approximate):
    return reference.geglu(input, gate, approximate)


# ----------------------------------------------------------------------------------------------
# Triton backend (kernels/gelu.py): torch.library custom ops with fake implementations and
# autograd, shared by gelu (bias None) and bias_gelu. Triton is imported inside the ops only.
# ----------------------------------------------------------------------------------------------
def _triton_reasons(*, input, bias=None, gate=None, **_) -> List[str]:
    return [f"{name} is float64; the Triton kernels take float16, bfloat16 or float32"
            for name, t in (("input", input), ("bias", bias), ("gate", gate))
            if t is not None and t.dtype == torch.float64]


@custom_op("fastbert::gelu_fwd")
def _gelu_fwd_op(input: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    from ..kernels.gelu import bias_gelu_fwd

    return bias_gelu_fwd(input, bias, approximate)


@_gelu_fwd_op.register_fake
def _(input, bias, approximate):
    return input.new_empty(input.shape)


@custom_op("fastbert::gelu_bwd")
def _gelu_bwd_op(grad_out: Tensor, input: Tensor, bias: Optional[Tensor], approximate: str,
                 need_dbias: bool) -> Tuple[Tensor, Tensor]:
    """-> (dinput, dbias); dbias is an empty placeholder unless asked for (and bias given)."""
    from ..kernels.gelu import bias_gelu_bwd

    dx, db = bias_gelu_bwd(grad_out, input, bias, approximate, need_dbias)
    return dx, (db if db is not None else input.new_empty((0,)))


@_gelu_bwd_op.register_fake
def _(grad_out, input, bias, approximate, need_dbias):
    db = bias.new_empty(bias.shape) if need_dbias and bias is not None else input.new_empty((0,))
    return input.new_empty(input.shape), db


def _gelu_setup_context(ctx, inputs, output):
    input, bias, approximate = inputs
    ctx.save_for_backward(input, bias)
    ctx.approximate = approximate


def _gelu_backward(ctx, grad_out):
    input, bias = ctx.saved_tensors
    need_dx, need_db = ctx.needs_input_grad[:2]
    dx, db = _gelu_bwd_op(grad_out, input, bias, ctx.approximate, need_db)
    return dx if need_dx else None, db if need_db else None, None


_gelu_fwd_op.register_autograd(_gelu_backward, setup_context=_gelu_setup_context)


@register("gelu", "triton", reasons=_triton_reasons)
def _gelu_triton(input, approximate):
    return _gelu_fwd_op(input, None, approximate)


@register("bias_gelu", "triton", reasons=_triton_reasons)
def _bias_gelu_triton(input, bias, approximate):
    return _gelu_fwd_op(input, bias, approximate)


@custom_op("fastbert::geglu_fwd")
def _geglu_fwd_op(input: Tensor, gate: Optional[Tensor], approximate: str) -> Tensor:
    from ..kernels.gelu import geglu_fwd

    return geglu_fwd(input, gate, approximate)


def _geglu_fwd_fake(input, gate, approximate):  # the Triton and the CUDA op's
    shape = input.shape if gate is not None else (*input.shape[:-1], input.shape[-1] // 2)
    return input.new_empty(shape)


_geglu_fwd_op.register_fake(_geglu_fwd_fake)


@custom_op("fastbert::geglu_bwd")
def _geglu_bwd_op(grad_out: Tensor, input: Tensor, gate: Optional[Tensor],
                  approximate: str) -> Tuple[Tensor, Tensor]:
    """-> (dinput, dgate); dgate is an empty placeholder in the packed form (gate None)."""
    from ..kernels.gelu import geglu_bwd

    dx, dg = geglu_bwd(grad_out, input, gate, approximate)
    return dx, (dg if dg is not None else input.new_empty((0,)))


def _geglu_bwd_fake(grad_out, input, gate, approximate):
    return input.new_empty(input.shape), (gate.new_empty(gate.shape) if gate is not None
                                          else input.new_empty((0,)))


_geglu_bwd_op.register_fake(_geglu_bwd_fake)


def _geglu_setup_context(ctx, inputs, output):
    input, gate, approximate = inputs
    ctx.save_for_backward(input, gate)  # gelu(input) is recomputed, not stored
    ctx.approximate = approximate


def _geglu_backward_with(bwd: Callable) -> Callable:
    """The autograd backward of a geglu forward op whose backward op is ``bwd`` (Triton's, CUDA's)."""
    def backward(ctx, grad_out):
        input, gate = ctx.saved_tensors
        dx, dg = bwd(grad_out, input, gate, ctx.approximate)
        need_dx, need_dg = ctx.needs_input_grad[:2]
        return dx if need_dx else None, dg if need_dg else None, None
    return backward


_geglu_fwd_op.register_autograd(_geglu_backward_with(_geglu_bwd_op), setup_context=_geglu_setup_context)


@register("geglu", "triton", reasons=_triton_reasons)
def _geglu_triton(input, gate, approximate):
    return _geglu_fwd_op(input, gate, approximate)


# ----------------------------------------------------------------------------------------------
# CUDA backend (csrc/gelu, extension fastbert._C): torch.ops.fastbert_cuda.bias_gelu_{fwd,bwd},
# shared by gelu (bias None) and bias_gelu, and geglu_{fwd,bwd}. Fakes and autograd are registered here when the
# extension is first used (loaded lazily, also from inside torch.compile: backends.cuda_ops).
# ----------------------------------------------------------------------------------------------
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _cuda_reasons(*, input, bias=None, **_) -> List[str]:
    reasons = []
    if input.dtype not in _CUDA_DTYPES:  # a gate has input's dtype (checked by geglu)
        reasons.append(f"input dtype {input.dtype} is not supported by the CUDA kernels "
                       "(float16, bfloat16, float32)")
    if bias is not None and bias.dtype != input.dtype:
        reasons.append(f"bias dtype {bias.dtype} differs from input dtype {input.dtype} (the CUDA "
                       "kernels need them equal)")
    return reasons


def _cuda_ops():
    """torch.ops.fastbert_cuda, with the extension loaded and this family's fakes / autograd registered."""
    return cuda_ops("gelu")


def _register_cuda_ops(namespace: str = "fastbert_cuda") -> None:
    # `namespace`: also "fastbert_emu", the CPU-emulated build of the same kernels (tests/cuda_emu).
    lib = namespace + "::"
    ops = getattr(torch.ops, namespace)

    @torch.library.register_fake(lib + "bias_gelu_fwd")
    def _(input, bias, approximate):
        return input.new_empty(input.shape)

    @torch.library.register_fake(lib + "bias_gelu_bwd")
    def _(grad_out, input, bias, approximate, need_bias_grad):
        n = input.shape[-1] if need_bias_grad and bias is not None else 0
        return input.new_empty(input.shape), input.new_empty((n,))

    def setup(ctx, inputs, output):
        input, bias, approximate = inputs
        ctx.save_for_backward(input, bias)  # gelu'(input + bias) is recomputed, nothing else stored
        ctx.approximate = approximate

    def backward(ctx, grad_out):
        input, bias = ctx.saved_tensors
        need_dx, need_db = ctx.needs_input_grad[:2]
        dx, db = ops.bias_gelu_bwd(grad_out, input, bias, ctx.approximate, need_db and bias is not None)
        return dx if need_dx else None, db if need_db else None, None

    torch.library.register_autograd(lib + "bias_gelu_fwd",
                                    first_order_only(lib + "bias_gelu_fwd", backward), setup_context=setup)

    torch.library.register_fake(lib + "geglu_fwd", _geglu_fwd_fake)
    torch.library.register_fake(lib + "geglu_bwd", _geglu_bwd_fake)

    torch.library.register_autograd(lib + "geglu_fwd",
                                    first_order_only(lib + "geglu_fwd", _geglu_backward_with(ops.geglu_bwd)),
                                    setup_context=_geglu_setup_context)


register_cuda_family("gelu", _register_cuda_ops)


@register("gelu", "cuda", reasons=_cuda_reasons)
def _gelu_cuda(input, approximate):
    ops = _cuda_ops()
    if input.dim() == 0:  # the kernels take (..., N)
        return ops.bias_gelu_fwd(input.reshape(1), None, approximate).reshape(())
    return ops.bias_gelu_fwd(input, None, approximate)


@register("bias_gelu", "cuda", reasons=_cuda_reasons)
def _bias_gelu_cuda(input, bias, approximate):
    return _cuda_ops().bias_gelu_fwd(input, bias, approximate)


@register("geglu", "cuda", reasons=_cuda_reasons)
def _geglu_cuda(input, gate, approximate):
    if input.dim() == 0:  # the kernels take (..., N); only the two-tensor form can be 0-d
        return _cuda_ops().geglu_fwd(input.reshape(1), gate.reshape(1), approximate).reshape(())
    return _cuda_ops().geglu_fwd(input, gate, approximate)
