"""Memory-bound cases: layer_norm, add_layer_norm (BERT's residual + bias + LayerNorm output
sublayer), bias_gelu, gelu and geglu, in GB/s (see :func:`~fastbert.benchmarks.common.norm_bytes`
and, for add_layer_norm with dropout, :func:`add_layer_norm_bytes`).

Peers: torch eager (``F.layer_norm``, and the unfused composition for the fused ops),
``torch.compile`` of the same composition, and Liger-Kernel's and apex's LayerNorm and
Liger-Kernel's GEGLU when installed. Shapes: 16384 rows x 768 / 1024 / 4096 / 8192, fp16 and bf16,
forward and backward (for geglu, N is the output width: the input is 16384 x 2N), and the
mixed-precision add_layer_norm (bf16 input, fp32 residual and parameters: "bf16+fp32", the layer
as autocast runs it) at 768 / 1024 / 4096. Each result is checked against ``fastbert.reference``
(output and every gradient) with PyTorch eager's error in the same precision as the yardstick,
before it is timed.

add_layer_norm runs in two forms: dropout_p = 0 (inference), and BERT's training form
``layer_norm(dropout(x + input_bias, p=0.1) + residual)`` (forward and backward at the same widths,
fp16 and bf16; plus the forward with ``return_residual=True``, which writes the pre-norm sum as a
pre-LN model carries it on). A dropout result cannot be compared with a reference that draws
another mask, so each implementation's own mask is recovered and checked first (see
:func:`_dropout_impl` and :func:`norm_case`).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .common import (Case, CheckResult, Impl, Prepared, Unavailable, compare, dtype_name,
                     fastbert_impl, norm_bytes, ns, configure_compile)

__all__ = ["cases", "norm_case", "add_layer_norm_bytes", "OPS", "ROWS", "WIDTHS", "DROPOUT_P"]

FAMILY = "norms"
OPS = ("layer_norm", "add_layer_norm", "bias_gelu", "gelu", "geglu")
# geglu runs the tanh form: the only one Liger-Kernel's GEGLU computes, so every peer does the same.
GEGLU_APPROX = "tanh"
ROWS = 16384
WIDTHS = (768, 1024, 4096, 8192)
EPS = 1e-5
DROPOUT_P = 0.1  # BERT's hidden_dropout_prob: the training form of add_layer_norm
# A kept fraction further than this many binomial standard deviations from 1 - p fails the check
# (a correct mask fails it with probability ~2e-9).
KEPT_FRACTION_SIGMAS = 6.0

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


def _add_ln_dropout_eager(x, residual, weight, bias, input_bias, p, return_sum=False):
    """BERT's output sublayer in training, unfused: layer_norm(dropout(x + input_bias) + residual);
    also returns the pre-norm sum with ``return_sum`` (``return_residual=True``)."""
    s = F.dropout(x + input_bias, p, training=True) + residual
    out = F.layer_norm(s, (x.shape[-1],), weight, bias, EPS)
    return (out, s) if return_sum else out


def _add_ln_masked_eager(x, residual, weight, bias, input_bias, keep, p, return_sum=False):
    """The same in the inputs' precision with a given keep-mask (bool, True = kept), applied as
    torch's dropout applies its own: the check's low-precision yardstick."""
    h = x + input_bias
    s = h * keep.to(h.dtype) * (1.0 / (1.0 - p)) + residual
    out = F.layer_norm(s, (x.shape[-1],), weight, bias, EPS)
    return (out, s) if return_sum else out


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


# ----------------------------------------------------------------------------------------------
# add_layer_norm with dropout (BERT's training form)
# ----------------------------------------------------------------------------------------------
def add_layer_norm_bytes(pass_: str, rows: int, cols: int, itemsize: int,
                         param_itemsize: Optional[int] = None,
                         residual_itemsize: Optional[int] = None, *, dropout: bool = False,
                         return_residual: bool = False) -> float:
    """:func:`~fastbert.benchmarks.common.norm_bytes` of add_layer_norm, extended to its training
    forms under the same convention (each tensor the fused kernel must read or write, once; the
    same count for every implementation of a case).

    dropout: the keep-mask is not a tensor the op must move. fastbert's kernels (Triton and CUDA)
        draw it from a seed (an int64 (1,) tensor, 8 bytes, not counted) and regenerate it in the
        backward; torch eager and torch.compile store a bool mask and read it back, bytes they move
        beyond the count. So the forward moves what it moves without dropout, and the backward
        writes the input's gradient apart from the residual's (it is the residual's masked and
        scaled): read dy, input, residual, input_bias, weight; write dinput, dresidual, dweight,
        dbias, dinput_bias (as the mixed-precision count, which already writes them apart).
        The backward counts input and residual, not a saved pre-norm sum, as without dropout: the
        Triton kernels recompute the sum from them; the CUDA kernels write the sum in the forward
        and read it back instead (one tensor more forward, one less backward: the same sum).
    return_residual (forward only): the pre-norm sum is written too, in the results' dtype.
    """
    if pass_ == "fwd+bwd":
        return sum(add_layer_norm_bytes(p, rows, cols, itemsize, param_itemsize, residual_itemsize,
                                        dropout=dropout, return_residual=return_residual)
                   for p in ("fwd", "bwd"))
    total = norm_bytes("add_layer_norm", pass_, rows, cols, itemsize, param_itemsize,
                       residual_itemsize)
    r = itemsize if residual_itemsize is None else residual_itemsize
    if return_residual:
        if pass_ != "fwd":
            raise ValueError("return_residual is counted for the forward only (the runner feeds a "
                             "single upstream gradient, so no case times its backward)")
        total += rows * cols * max(itemsize, r)
    if pass_ == "bwd" and dropout and r == itemsize:  # otherwise norm_bytes writes them apart
        total += rows * cols * itemsize
    return float(total)


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _mask_probe_inputs(s, grad: bool):
    """Inputs whose pre-norm sum is the dropout mask itself: x = 1, residual = input_bias = 0
    (weight = 1, bias = 0), so that a kept element sums to 1 / (1 - p) and a dropped one to 0.
    On the case's inputs the two candidates (residual, and (x + input_bias) / (1 - p) + residual)
    coincide where x + input_bias is near 0, which leaves the mask undetermined exactly where the
    input's gradient (the residual's, masked) still depends on it."""
    t = {"x": torch.ones_like(s.x), "residual": torch.zeros_like(s.residual),
         "weight": torch.ones_like(s.weight), "bias": torch.zeros_like(s.bias),
         "input_bias": torch.zeros_like(s.input_bias)}
    for v in t.values():
        v.requires_grad_(grad)  # as the case's leaves: torch.compile reuses the timed graph's kind
    return ns(device=s.device, **t)


def _dropout_impl(name: str, make_run: Callable[[Case, object], Callable], return_residual: bool,
                  **impl_kw) -> Impl:
    """An implementation of add_layer_norm with dropout whose mask the check can recover.

    ``make_run(case, state)`` returns ``run(state, return_sum)``: the implementation's call,
    returning ``(out, pre_norm_sum)`` when ``return_sum`` (make_run raises Unavailable when it
    cannot run here). The timed forward is ``run(state, return_residual)``.

    Every implementation draws its mask from torch's generator of the inputs' device (fastbert its
    seed, torch's dropout and torch.compile's kernels their random numbers), and the mask does not
    depend on the input values. So after the check's forward (and backward), ``adapt`` rewinds that
    generator to the state the forward started from (taken at the end of prepare, which the runner
    and pytest_support follow with the check), runs ``run(probe, True)`` on
    :func:`_mask_probe_inputs` (pre-norm sum = the mask, scaled), restores the generator, and
    leaves that sum (and the timed call's own sum, with return_residual) on the state for the
    case's check. A probe out of step with the checked call makes the check fail, never pass: the
    call's output and gradients then disagree with the reference on the probe's mask. Both forms
    run once in prepare, so that torch.compile has compiled them before the state is taken."""
    def prepare(case, s):
        run = make_run(case, s)
        grad = case.pass_ != "fwd"
        probe = _mask_probe_inputs(s, grad)
        with torch.set_grad_enabled(grad):
            run(s, return_residual)
            run(probe, True)
        device = torch.device(s.device)
        start = _rng_state(device)  # the state the check's forward, the next call, draws from

        def adapt(st, out, grads):
            pre_norm_sum = None
            if return_residual:
                out, pre_norm_sum = out
                pre_norm_sum = pre_norm_sum.detach()
            after = _rng_state(device)
            _set_rng_state(device, start)
            try:
                with torch.set_grad_enabled(grad):
                    mask_sum = run(probe, True)[1].detach()
            finally:
                _set_rng_state(device, after)
            st.dropout_probe = (mask_sum, pre_norm_sum)
            return out, grads

        return Prepared(lambda st: run(st, return_residual), adapt=adapt)
    return Impl(name, prepare, **impl_kw)


def _dropout_impls(p: float, return_residual: bool) -> List[Impl]:
    op = "add_layer_norm"

    def fastbert_run(backend):
        def run(st, return_sum):
            import fastbert

            return fastbert.add_layer_norm(st.x, st.residual, st.weight, st.bias, EPS,
                                           input_bias=st.input_bias, dropout_p=p,
                                           return_residual=return_sum, backend=backend)
        return run

    def fastbert(backend):
        run = fastbert_run(backend)
        # availability: the backend's reasons here, and the op's dispatch declining this call
        available = fastbert_impl(backend, op, lambda st, b: run(st, return_residual))

        def make_run(case, s):
            available.prepare(case, s)  # raises Unavailable with the reason
            return run
        return _dropout_impl(available.name, make_run, return_residual, ours=True, backend=backend)

    def eager(case, s):
        return lambda st, ret: _add_ln_dropout_eager(*_inputs(op, st), p, ret)

    def compiled(case, s):
        configure_compile()
        fns = {ret: torch.compile(functools.partial(_add_ln_dropout_eager, p=p, return_sum=ret),
                                  dynamic=False) for ret in (False, True)}
        return lambda st, ret: fns[ret](*_inputs(op, st))

    return [fastbert("triton"), fastbert("cuda"),
            _dropout_impl("torch-eager", eager, return_residual),
            _dropout_impl("torch-compile", compiled, return_residual)]


def _kept_fraction(keep: torch.Tensor, p: float) -> CheckResult:
    """The kept fraction within KEPT_FRACTION_SIGMAS binomial standard deviations of 1 - p."""
    n = keep.numel()
    frac = float(keep.sum()) / n
    allowed = KEPT_FRACTION_SIGMAS * math.sqrt(p * (1.0 - p) / n)
    err = abs(frac - (1.0 - p))
    return CheckResult(err <= allowed, err, allowed,
                       f"kept fraction {frac:.5f} of {n} (1 - p = {1.0 - p:g})")


def norm_case(op: str, cols: int, dtype: torch.dtype = torch.float16, *, pass_: str = "fwd",
              rows: int = ROWS, quick: bool = False,
              residual_dtype: Optional[torch.dtype] = None, dropout_p: float = 0.0,
              return_residual: bool = False) -> Case:
    """One case of ``op`` on ``rows x cols`` inputs of ``dtype``. ``residual_dtype`` (add_layer_norm
    only) puts the residual and the parameters in another dtype: the mixed-precision layer, e.g. a
    bf16 matmul output added to an fp32 residual stream (recorded as dtype "bf16+fp32").

    ``dropout_p`` (add_layer_norm only) times the training form, ``layer_norm(dropout(x +
    input_bias, p) + residual)``, and ``return_residual`` (with dropout, forward only: the runner
    feeds one upstream gradient) its pre-LN form, which also returns the pre-norm sum. Such a case
    checks each implementation on its own mask: the mask is read off the pre-norm sum of a probe
    run that draws the same mask (see :func:`_dropout_impl`); every element of that sum must be 0
    or 1 / (1 - p) within the output dtype's rounding and the kept fraction within
    ``KEPT_FRACTION_SIGMAS`` binomial standard deviations of 1 - p; then the output (and the
    pre-norm sum, with return_residual) and every gradient are compared with
    ``fastbert.reference.add_layer_norm`` given that mask, against the error of torch's eager
    composition with that mask in the inputs' precision. A kernel that forgets the 1 / (1 - p)
    scale, or whose backward (or whose timed call) uses another mask than the probe sees, fails."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if residual_dtype is not None and op != "add_layer_norm":
        raise ValueError(f"residual_dtype is for add_layer_norm, not {op!r}")
    if (dropout_p or return_residual) and op != "add_layer_norm":
        raise ValueError(f"dropout_p and return_residual are for add_layer_norm, not {op!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if return_residual and (pass_ != "fwd" or dropout_p == 0.0):
        raise ValueError("return_residual is timed in the forward with dropout only (the runner "
                         "feeds one upstream gradient)")
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

    def compare_with(s, out, grads, ref_fn, low_fn, first=(), pre_norm_sum=None):
        """``first`` items, then the output (and the pre-norm sum), then every gradient."""
        hi = torch.float64 if torch.float32 in (dtype, rdtype) else torch.float32
        need_grad = len(grads) > 0

        def run(fn, high):
            xs = [t.detach().to(hi) if high else t.detach().clone() for t in _inputs(op, s)]
            for x in xs:
                x.requires_grad_(need_grad)
            with torch.set_grad_enabled(need_grad):
                o = fn(*xs)
                outs = list(o) if isinstance(o, tuple) else [o]
                if need_grad:
                    outs[0].backward(s.do.to(outs[0].dtype))
            return [t.detach() for t in outs], [x.grad for x in xs]

        ref_o, ref_g = run(ref_fn, True)
        low_o, low_g = run(low_fn, False)
        items = list(first) + [("output", out, ref_o[0], low_o[0])]
        if pre_norm_sum is not None:
            items.append(("pre-norm sum", pre_norm_sum, ref_o[1], low_o[1]))
        items += [(f"grad {n}", g, rg, lg) for n, g, rg, lg in zip(names, grads, ref_g, low_g)]
        return compare(items)

    def check(s, out, grads, variant):
        return compare_with(s, out, grads, _reference(op), EAGER[op])

    def dropout_check(s, out, grads, variant):
        probe = vars(s).pop("dropout_probe", None)  # left by this implementation's adapt
        if probe is None:
            return CheckResult(False, math.inf, 0.0, "dropout mask (no probe run recorded)")
        mask_sum, pre_norm_sum = probe
        scale = 1.0 / (1.0 - dropout_p)
        keep = mask_sum.double() > 0.5 * scale  # nearer 1 / (1 - p) than 0; checked just below
        first = [("pre-norm sum of the mask probe (0 or 1 / (1 - p))", mask_sum,
                  keep.double() * scale, keep.to(mask_sum.dtype) * scale)]

        def ref_fn(x, r, w, b, ib):
            from .. import reference

            return reference.add_layer_norm(x, r, w, b, EPS, input_bias=ib, dropout_p=dropout_p,
                                            dropout_mask=keep, return_residual=return_residual)

        def low_fn(*inputs):
            return _add_ln_masked_eager(*inputs, keep, dropout_p, return_residual)

        res = compare_with(s, out, grads, ref_fn, low_fn, first, pre_norm_sum)
        if not res.ok:
            return res
        frac = _kept_fraction(keep, dropout_p)
        return res if frac.ok else frac

    suffix, series, params = "", f"{op} {pass_} {dt}", {"rows": rows, "N": cols}
    if dropout_p > 0.0:
        impls = _dropout_impls(dropout_p, return_residual)
        suffix += f"-dropout{dropout_p:g}"
        series += f" dropout {dropout_p:g}"
        params["dropout_p"] = dropout_p
        if return_residual:
            suffix += "-return_residual"
            series += " return_residual"
            params["return_residual"] = True
    else:
        impls = [fastbert_impl("triton", op, _fastbert(op)),
                 fastbert_impl("cuda", op, _fastbert(op)), _eager_impl(op), _compile_impl(op)]
    if op == "layer_norm":
        impls += [_liger_impl(), _apex_impl()]
    if op == "geglu":
        impls.append(_liger_geglu_impl())
    if op == "add_layer_norm":
        work = add_layer_norm_bytes(pass_, rows, cols, itemsize, r_itemsize, r_itemsize,
                                    dropout=dropout_p > 0.0, return_residual=return_residual)
    else:
        work = norm_bytes(op, pass_, rows, cols, itemsize, param_itemsize=r_itemsize,
                          residual_itemsize=r_itemsize)
    return Case(FAMILY, op, f"{op}-{pass_}-R{rows}-N{cols}-{dt}{suffix}", pass_, dtype, params,
                "GB/s", work, "N", series, setup, impls, dtype_label=dt,
                leaves=lambda s: _inputs(op, s), check=dropout_check if dropout_p > 0.0 else check,
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
            if op != "add_layer_norm":
                continue
            for n in WIDTHS[:3]:  # mixed precision: a bf16 matmul output, an fp32 stream
                out.append(norm_case(op, n, torch.bfloat16, pass_=pass_, quick=n == 768,
                                     residual_dtype=torch.float32))
            # BERT's training form (dropout 0.1; quick: fp16 at BERT-base's 768), and in the
            # forward the pre-LN form that also writes the pre-norm sum
            for dtype in (torch.float16, torch.bfloat16):
                for n in WIDTHS:
                    out.append(norm_case(op, n, dtype, pass_=pass_, dropout_p=DROPOUT_P,
                                         quick=dtype == torch.float16 and n == 768))
                    if pass_ == "fwd":
                        out.append(norm_case(op, n, dtype, pass_=pass_, dropout_p=DROPOUT_P,
                                             return_residual=True))
    return [c for c in out if c.quick] if quick else out
