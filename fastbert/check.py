"""``fastbert check``: every op on every backend available here, against the reference.

Each op has one small case with awkward sizes. A backend row runs the public op with that backend
on random inputs, and compares the output and the gradient of every differentiable input (same
upstream gradient) with ``fastbert.reference`` in float64, using the rule of
:mod:`fastbert.testing`, then the output once more under ``torch.no_grad()`` (inference: some
backends take other kernels then, e.g. the CUDA backend's fused attention forward; a backend that
only serves inference is checked on that alone). A "reference" row checks the reference itself against independent torch
computations (SDPA's math backend, ``F.layer_norm``, ``F.gelu``) in float64.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import backends, reference
from .testing import check_close, max_err, rand


@dataclass
class Case:
    """Inputs for one op: ``make(dtype, device)`` -> (tensor args, kwargs); tensors with
    ``requires_grad`` get their gradients checked."""
    op: str
    make: Callable[[torch.dtype, str], Tuple[tuple, dict]]
    independent: Callable  # the same math in float64 through torch's own ops, not fastbert.reference


def _sdpa_case(dtype, device):
    """A trainable additive bias shared by the batch (ALiBi / relative-position style), with -inf
    at a few keys (padding): its gradient is checked too, through the kernel that sums it over the
    broadcast batch dim."""
    b, h, lq, lk, d = 2, 3, 17, 33, 40
    q = rand((b, h, lq, d), dtype, device, requires_grad=True)
    k = rand((b, h, lk, d), dtype, device, requires_grad=True)
    v = rand((b, h, lk, d), dtype, device, requires_grad=True)
    bias = rand((1, h, lq, lk), dtype, device, scale=0.5)
    bias[..., [5, 20, 31]] = float("-inf")
    return (q, k, v, bias.requires_grad_(True)), {}


def _sdpa_independent(q, k, v, attn_mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def _varlen_independent(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, alibi_slopes=None,
                        window_size=None):
    """Per sequence, torch's SDPA with GQA and an explicit bias: ALiBi, the window and causal as
    -inf."""
    outs = []
    for s in range(cu_q.numel() - 1):
        a, b = int(cu_q[s]), int(cu_q[s + 1])
        c, d = int(cu_k[s]), int(cu_k[s + 1])
        i = torch.arange(b - a, device=q.device)[:, None]
        j = torch.arange(d - c, device=q.device)[None, :]
        bias = torch.zeros(q.shape[1], b - a, d - c, dtype=q.dtype, device=q.device)
        if alibi_slopes is not None:
            bias = bias - alibi_slopes.to(q.dtype)[:, None, None] * (i - j).abs()
        drop = torch.zeros(b - a, d - c, dtype=torch.bool, device=q.device)
        if window_size is not None:
            drop |= (j < i - window_size[0]) | (j > i + window_size[1])
        if is_causal:
            drop |= j > i
        bias = bias.masked_fill(drop, float("-inf"))
        o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[c:d].transpose(0, 1),
                                           v[c:d].transpose(0, 1), attn_mask=bias, enable_gqa=True)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def _varlen_case(dtype, device):
    """Grouped-query (4 query heads on 2 key / value heads) with ALiBi and a sliding window."""
    lens = [5, 17, 1]
    h, hkv, d = 4, 2, 16
    total = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
    q = rand((total, h, d), dtype, device, requires_grad=True)
    k = rand((total, hkv, d), dtype, device, requires_grad=True)
    v = rand((total, hkv, d), dtype, device, requires_grad=True)
    slopes = torch.tensor([2.0 ** (-2 * (i + 1)) for i in range(h)], device=device)
    return (q, k, v, cu, cu, max(lens), max(lens)), {"alibi_slopes": slopes, "window_size": (4, 2)}


def _block_sparse_case(dtype, device):
    b, h, l, d, bs = 1, 2, 40, 16, 16
    q = rand((b, h, l, d), dtype, device, requires_grad=True)
    k = rand((b, h, l, d), dtype, device, requires_grad=True)
    v = rand((b, h, l, d), dtype, device, requires_grad=True)
    nb = math.ceil(l / bs)
    layout = torch.eye(nb, dtype=torch.bool, device=device)[None] | (torch.arange(nb, device=device) == 0)
    return (q, k, v, layout, bs), {}


def _block_sparse_independent(q, k, v, layout, block_size):
    mask = layout.repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, :q.shape[2], :k.shape[2]])


def _linformer_independent(q, k, v, pk, pv, key_padding_mask):
    keep = (~key_padding_mask)[:, None, :, None].to(k.dtype)
    h = q.shape[1]
    kp = torch.einsum("hnl,bhld->bhnd", pk.expand(h, *pk.shape[-2:]), k * keep)
    vp = torch.einsum("hnl,bhld->bhnd", pv.expand(h, *pv.shape[-2:]), v * keep)
    return F.scaled_dot_product_attention(q, kp, vp)


def _linformer_case(dtype, device):
    b, h, l, d, kp = 2, 2, 17, 16, 5
    q = rand((b, h, l, d), dtype, device, requires_grad=True)
    k = rand((b, h, l, d), dtype, device, requires_grad=True)
    v = rand((b, h, l, d), dtype, device, requires_grad=True)
    pk = rand((kp, l), dtype, device, requires_grad=True, scale=l ** -0.5)
    pv = rand((h, kp, l), dtype, device, requires_grad=True, scale=l ** -0.5)
    pad = torch.zeros(b, l, dtype=torch.bool, device=device)
    pad[1, -4:] = True
    return (q, k, v, pk, pv), {"key_padding_mask": pad}


def _layer_norm_case(dtype, device):
    x = rand((17, 97), dtype, device, requires_grad=True)
    w = rand((97,), dtype, device, requires_grad=True)
    bias = rand((97,), dtype, device, requires_grad=True)
    return (x, (97,), w, bias), {}


def _add_layer_norm_case(dtype, device):
    x = rand((17, 97), dtype, device, requires_grad=True)
    r = rand((17, 97), dtype, device, requires_grad=True)
    w = rand((97,), dtype, device, requires_grad=True)
    bias = rand((97,), dtype, device, requires_grad=True)
    ib = rand((97,), dtype, device, requires_grad=True)
    return (x, r, w, bias), {"input_bias": ib}


def _add_layer_norm_independent(x, r, w, b, eps=1e-5, input_bias=None):
    return F.layer_norm(x + input_bias + r, (x.shape[-1],), w, b, eps)


def _gelu_case(dtype, device):
    return (rand((17, 97), dtype, device, requires_grad=True),), {"approximate": "tanh"}


def _bias_gelu_case(dtype, device):
    x = rand((17, 97), dtype, device, requires_grad=True)
    return (x, rand((97,), dtype, device, requires_grad=True)), {}


def _geglu_case(dtype, device):
    return (rand((17, 2 * 97), dtype, device, requires_grad=True),), {}


def _geglu_independent(x):
    a, g = x.chunk(2, dim=-1)
    return F.gelu(a) * g


CASES: Dict[str, Case] = {c.op: c for c in [
    Case("scaled_dot_product_attention", _sdpa_case, _sdpa_independent),
    Case("varlen_attention", _varlen_case, _varlen_independent),
    Case("block_sparse_attention", _block_sparse_case, _block_sparse_independent),
    Case("linformer_attention", _linformer_case, _linformer_independent),
    Case("layer_norm", _layer_norm_case, lambda x, s, w, b: F.layer_norm(x, s, w, b)),
    Case("add_layer_norm", _add_layer_norm_case, _add_layer_norm_independent),
    Case("gelu", _gelu_case, lambda x, approximate: F.gelu(x, approximate=approximate)),
    Case("bias_gelu", _bias_gelu_case, lambda x, b: F.gelu(x + b)),
    Case("geglu", _geglu_case, _geglu_independent),
]}


def _public(op: str) -> Callable:
    import fastbert

    return getattr(fastbert, op)


def _detached_like(args, dtype=None):
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            t = a.detach().to(dtype or a.dtype).requires_grad_(a.requires_grad)
            out.append(t)
        else:
            out.append(a)
    return out


def _run(fn, args, kwargs, grad_out_seed: int):
    out = fn(*args, **kwargs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed)).to(out)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(out, leaves, g) if leaves else ()
    return [out] + list(grads)


def check_op(op: str, backend: str, dtype: torch.dtype, device: str) -> Tuple[bool, float, str]:
    """Returns (passed, worst ratio of error to allowed error, note) for one op x backend x dtype;
    a ratio <= 1 passes."""
    case = CASES[op]
    args, kwargs = case.make(dtype, device)
    ref_fn = getattr(reference, op)
    if backend == "reference":
        a64 = _detached_like(args, torch.float64)
        got = _run(ref_fn, a64, kwargs, 0)
        want = _run(case.independent, _detached_like(args, torch.float64), kwargs, 0)
        worst = max(max_err(x, y) for x, y in zip(got, want))
        return worst <= 1e-10, worst / 1e-10, "float64 vs torch, allowed 1e-10"
    fn = _public(op)
    want = _run(ref_fn, _detached_like(args, torch.float64), kwargs, 0)
    # The low-precision baseline: the same math computed entirely in the input dtype.
    lowp = _run(ref_fn, _detached_like(args), dict(kwargs, compute_dtype=dtype), 0)
    worst, ok, notes = 0.0, True, []

    def compare(got):  # got[i] against want[i]: the output first, then the gradients
        nonlocal worst, ok
        for x, y, low in zip(got, want, lowp):
            passed, err, allowed = check_close(x, y, low)
            ok = ok and passed
            worst = max(worst, err / allowed)

    try:  # output and gradients
        compare(_run(lambda *a, **k: fn(*a, **k, backend=backend), _detached_like(args), kwargs, 0))
    except backends.BackendError as e:  # e.g. an inference-only kernel: the forward below
        notes.append(f"no gradients: {e}")
    # Inference: without autograd some backends take other kernels (the fused CUDA attention).
    with torch.no_grad():
        inference = fn(*_detached_like(args), **kwargs, backend=backend)
    compare([inference])
    return ok, worst, "; ".join(["worst err / allowed (per element), with and without autograd"] + notes)


def plan(device: str) -> List[Tuple[str, str, torch.dtype]]:
    """(op, backend, dtype) triples that can run here."""
    return _plan(device)[0]


def _plan(device: str) -> Tuple[List[Tuple[str, str, torch.dtype]], Dict[str, List[str]]]:
    """The triples that can run here, and {why a backend / dtype is left out: the ops}."""
    rows, left_out = [], {}
    for op in CASES:
        rows.append((op, "reference", torch.float64))
        for b in ("torch", "triton", "cuda"):
            if b not in backends.implementations(op):
                continue
            reasons = backends.backend_reasons(b, torch.device(device))
            if reasons:
                left_out.setdefault(f"backend {b}: {'; '.join(reasons)}", []).append(op)
                continue
            dtypes = [torch.float32, torch.float16]
            if torch.device(device).type == "cuda":  # "cuda:1" too
                dtypes.append(torch.bfloat16)
            else:
                left_out.setdefault("bfloat16: run by `fastbert check` on a GPU only (on CPU "
                                    "Triton's interpreter gets bf16 tl.dot wrong and rounds bf16 "
                                    "by truncation; the test suite covers the norms there)",
                                    []).append(op)
            for dt in dtypes:
                rows.append((op, b, dt))
    return rows, left_out


def main(ops: Optional[List[str]] = None, device: Optional[str] = None) -> int:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print(f"fastbert check: no CUDA GPU is visible, so nothing can run on {device!r}; "
              "run `fastbert check` without --device to check every op here on the CPU", file=sys.stderr)
        return 2
    rows, left_out = _plan(device)
    rows = [r for r in rows if not ops or r[0] in ops]
    print(f"fastbert check on {device} ({len(rows)} checks)")
    for why, skipped_ops in left_out.items():
        skipped_ops = [op for op in dict.fromkeys(skipped_ops) if not ops or op in ops]
        if skipped_ops:
            print(f"  not checked here: {why} ({', '.join(skipped_ops)})")
    header = f"{'op':<30} {'backend':<10} {'dtype':<9} {'err/tol':>10}  result"
    print(header)
    print("-" * len(header))
    failures = skipped = 0
    for op, backend, dtype in rows:
        try:
            ok, worst, note = check_op(op, backend, dtype, device)
            status = "pass" if ok else "FAIL"
        except backends.BackendError as e:
            ok, worst, status, note = True, 0.0, "skip", str(e)
            skipped += 1
        except Exception as e:  # a crash is a failure, with its message
            ok, worst, status, note = False, float("nan"), "FAIL", f"{type(e).__name__}: {e}"
        failures += not ok
        dt = str(dtype).replace("torch.", "")
        print(f"{op:<30} {backend:<10} {dt:<9} {worst:>10.3g}  {status}"
              + (f"  ({note})" if status != "pass" or backend == "reference" else ""), flush=True)
    print(f"{len(rows) - failures - skipped} passed, {failures} failed"
          + (f", {skipped} skipped (the backend declined the call)" if skipped else ""))
    return 1 if failures else 0
