"""Memory-bound cases: layer_norm, add_layer_norm (BERT's residual + bias + LayerNorm output
sublayer, dropout_p = 0), bias_gelu, gelu and geglu, in GB/s (see
:func:`~fastbert.benchmarks.common.norm_bytes`).

Peers: torch eager (``F.layer_norm``, and the unfused composition for the fused ops),
``torch.compile`` of the same composition, and Liger-Kernel's and apex's LayerNorm and
Liger-Kernel's GEGLU when installed. Shapes: 16384 rows x 768 / 1024 / 4096 / 8192, fp16 and bf16,
forward and backward (for geglu, N is the output width: the input is 16384 x 2N), and the
mixed-precision add_layer_norm (bf16 input, fp32 residual and parameters: "bf16+fp32", the layer
as autocast runs it) at 768 / 1024 / 4096. Each result is checked against ``fastbert.reference``
(output and every gradient) with PyTorch eager's error in the same precision as the yardstick,
before it is timed.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .common import (Case, Impl, Prepared, Unavailable, compare, dtype_name, fastbert_impl,
                     norm_bytes, ns, configure_compile)

__all__ = ["cases", "norm_case", "OPS", "ROWS", "WIDTHS"]

FAMILY = "norms"
OPS = ("layer_norm", "add_layer_norm", "bias_gelu", "gelu", "geglu")
# geglu runs the tanh form: the only one Liger-Kernel's GEGLU computes, so every peer does the same.
GEGLU_APPROX = "tanh"
ROWS = 16384
WIDTHS = (768, 1024, 4096, 8192)
EPS = 1e-5

# Inputs of each op, in the order its composition below takes them (also the gradient leaves).
_INPUTS = {
    "layer_norm": ("x", "weight", "bias"),
    "add_layer_norm": ("x", "residual", "weight", "bias", "input_bias"),
    "gelu": ("x",),
    "bias_gelu": ("x", "bias"),
    "geglu": ("x",),
}


# The unfused PyTorch compositions (torch eager, and what torch.compile gets).
def _ln_eager(x, weight, bias):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, EPS)


def _add_ln_eager(x, residual, weight, bias, input_bias):
    return F.layer_norm(x + input_bias + residual, (x.shape[-1],), weight, bias, EPS)


def _gelu_eager(x):
    return F.gelu(x)


def _bias_gelu_eager(x, bias):
    return F.gelu(x + bias)


def _geglu_eager(x):
    a, g = x.chunk(2, dim=-1)
    return F.gelu(a, approximate=GEGLU_APPROX) * g


EAGER: Dict[str, Callable] = {"layer_norm": _ln_eager, "add_layer_norm": _add_ln_eager,
                              "gelu": _gelu_eager, "bias_gelu": _bias_gelu_eager,
                              "geglu": _geglu_eager}


def _reference(op: str) -> Callable:
    from .. import reference

    if op == "layer_norm":
        return lambda x, w, b: reference.layer_norm(x, (x.shape[-1],), w, b, EPS)
    if op == "add_layer_norm":
        return lambda x, r, w, b, ib: reference.add_layer_norm(x, r, w, b, EPS, input_bias=ib)
    if op == "gelu":
        return lambda x: reference.gelu(x)
    if op == "geglu":
        return lambda x: reference.geglu(x, None, GEGLU_APPROX)
    return lambda x, b: reference.bias_gelu(x, b)


def _fastbert(op: str) -> Callable:
    def run(s, backend):
        import fastbert

        if op == "layer_norm":
            return fastbert.layer_norm(s.x, (s.x.shape[-1],), s.weight, s.bias, EPS, backend=backend)
        if op == "add_layer_norm":
            return fastbert.add_layer_norm(s.x, s.residual, s.weight, s.bias, EPS,
                                           input_bias=s.input_bias, backend=backend)
        if op == "gelu":
            return fastbert.gelu(s.x, backend=backend)
        if op == "geglu":
            return fastbert.geglu(s.x, None, GEGLU_APPROX, backend=backend)
        return fastbert.bias_gelu(s.x, s.bias, backend=backend)
    return run


def _inputs(op: str, s) -> list:
    return [getattr(s, n) for n in _INPUTS[op]]


def _eager_impl(op: str) -> Impl:
    fn = EAGER[op]
    return Impl("torch-eager", lambda case, s: Prepared(lambda st: fn(*_inputs(op, st))))


def _compile_impl(op: str) -> Impl:
    def prepare(case, s):
        configure_compile()
        compiled = torch.compile(EAGER[op], dynamic=False)
        return Prepared(lambda st: compiled(*_inputs(op, st)))
    return Impl("torch-compile", prepare)


def _liger_impl() -> Impl:
    def prepare(case, s):
        try:
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        except ImportError as e:
            raise Unavailable(f"Liger-Kernel is not installed ({e})") from None
        return Prepared(lambda st: LigerLayerNormFunction.apply(st.x, st.weight, st.bias, EPS))
    return Impl("liger", prepare)


def _liger_geglu_impl() -> Impl:
    def prepare(case, s):
        try:
            from liger_kernel.ops.geglu import LigerGELUMulFunction
        except ImportError as e:
            raise Unavailable(f"Liger-Kernel is not installed ({e})") from None

        def halves(st):
            # Liger's GEGLU copies non-contiguous inputs (ensure_contiguous), as the halves of the
            # packed x are; in real use (LigerGEGLUMLP) they are two projections' contiguous
            # outputs, so it gets those, made once per input set outside the timed region
            if getattr(st, "liger_halves", None) is None:
                st.liger_halves = [t.detach().contiguous().requires_grad_(st.x.requires_grad)
                                   for t in st.x.chunk(2, dim=-1)]
            return st.liger_halves

        def adapt(st, out, grads):  # the two halves' gradients as the packed input's
            return out, [torch.cat(grads, dim=-1)] if grads else grads

        return Prepared(lambda st: LigerGELUMulFunction.apply(*halves(st)), leaves=halves,
                        adapt=adapt,
                        note="two contiguous inputs; its backward overwrites its saved inputs "
                             "in place, so repeated bwd timings run on those values")
    return Impl("liger", prepare)


def _apex_impl() -> Impl:
    def prepare(case, s):
        try:
            from apex.normalization.fused_layer_norm import fused_layer_norm_affine
        except ImportError as e:
            raise Unavailable(f"apex (with its fused LayerNorm) is not installed ({e})") from None
        return Prepared(lambda st: fused_layer_norm_affine(st.x, st.weight, st.bias,
                                                           (st.x.shape[-1],), EPS))
    return Impl("apex", prepare)


def norm_case(op: str, cols: int, dtype: torch.dtype = torch.float16, *, pass_: str = "fwd",
              rows: int = ROWS, quick: bool = False,
              residual_dtype: Optional[torch.dtype] = None) -> Case:
    """One case of ``op`` on ``rows x cols`` inputs of ``dtype``. ``residual_dtype`` (add_layer_norm
    only) puts the residual and the parameters in another dtype: the mixed-precision layer, e.g. a
    bf16 matmul output added to an fp32 residual stream (recorded as dtype "bf16+fp32")."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if residual_dtype is not None and op != "add_layer_norm":
        raise ValueError(f"residual_dtype is for add_layer_norm, not {op!r}")
    rdtype = dtype if residual_dtype is None else residual_dtype
    out_dtype = torch.promote_types(dtype, rdtype)
    dt = dtype_name(dtype) if rdtype == dtype else f"{dtype_name(dtype)}+{dtype_name(rdtype)}"
    itemsize = torch.empty((), dtype=dtype).element_size()
    r_itemsize = torch.empty((), dtype=rdtype).element_size()
    req_grad = pass_ != "fwd"
    names = _INPUTS[op]

    def setup(device):
        x_cols = 2 * cols if op == "geglu" else cols  # geglu: both halves in one input
        t = {"x": torch.randn(rows, x_cols, device=device, dtype=dtype)}
        if "residual" in names:
            t["residual"] = torch.randn(rows, cols, device=device, dtype=rdtype)
        if "weight" in names:
            t["weight"] = 1.0 + 0.1 * torch.randn(cols, device=device, dtype=rdtype)
        if "bias" in names:
            t["bias"] = 0.1 * torch.randn(cols, device=device, dtype=rdtype)
        if "input_bias" in names:
            t["input_bias"] = 0.1 * torch.randn(cols, device=device, dtype=rdtype)
        for v in t.values():
            v.requires_grad_(req_grad)
        return ns(device=torch.device(device),
                  do=torch.randn(rows, cols, device=device, dtype=out_dtype), **t)

    def check(s, out, grads, variant):
        hi = torch.float64 if torch.float32 in (dtype, rdtype) else torch.float32
        need_grad = len(grads) > 0

        def run(fn, high):
            xs = [t.detach().to(hi) if high else t.detach().clone() for t in _inputs(op, s)]
            for x in xs:
                x.requires_grad_(need_grad)
            with torch.set_grad_enabled(need_grad):
                o = fn(*xs)
                if need_grad:
                    o.backward(s.do.to(o.dtype))
            return o.detach(), [x.grad for x in xs]

        ref_o, ref_g = run(_reference(op), True)
        low_o, low_g = run(EAGER[op], False)
        items = [("output", out, ref_o, low_o)]
        items += [(f"grad {n}", g, rg, lg) for n, g, rg, lg in zip(names, grads, ref_g, low_g)]
        return compare(items)

    impls = [fastbert_impl("triton", op, _fastbert(op)), fastbert_impl("cuda", op, _fastbert(op)),
             _eager_impl(op), _compile_impl(op)]
    if op == "layer_norm":
        impls += [_liger_impl(), _apex_impl()]
    if op == "geglu":
        impls.append(_liger_geglu_impl())
    work = norm_bytes(op, pass_, rows, cols, itemsize, param_itemsize=r_itemsize,
                      residual_itemsize=r_itemsize)
    return Case(FAMILY, op, f"{op}-{pass_}-R{rows}-N{cols}-{dt}", pass_, dtype,
                {"rows": rows, "N": cols}, "GB/s", work, "N", f"{op} {pass_} {dt}", setup, impls,
                dtype_label=dt, leaves=lambda s: _inputs(op, s), check=check,
                footprint=int(work), quick=quick)


def cases(quick: bool = False) -> List[Case]:
    out = []
    for op in OPS:
        for pass_ in ("fwd", "bwd"):
            for dtype in (torch.float16, torch.bfloat16):
                for n in WIDTHS:
                    # quick: fp16 at 768 and 4096; geglu at 1024 only (ModernBERT-base's 1152 is near)
                    q = dtype == torch.float16 and n in ((1024,) if op == "geglu" else (768, 4096))
                    out.append(norm_case(op, n, dtype, pass_=pass_, quick=q))
            if op == "add_layer_norm":  # mixed precision: a bf16 matmul output, an fp32 stream
                for n in WIDTHS[:3]:
                    out.append(norm_case(op, n, torch.bfloat16, pass_=pass_, quick=n == 768,
                                         residual_dtype=torch.float32))
    return [c for c in out if c.quick] if quick else out
