"""backend="cuda": the CUDA C++ kernels of csrc/ (extension fastbert._C), as a whole.

Without a GPU: the extension, when built, imports and registers its operators; the glue (fake
kernels, autograd formulas) traces on meta tensors; the reasons say exactly what the kernels
support. On a GPU (``cuda`` mark): the statistics of the dropout RNG that every kernel family
shares. Each family's kernel tests (``test_cuda_*``) are in tests/test_layer_norm.py,
tests/test_gelu.py and tests/test_attention.py: output and every gradient against the fp64
reference with the same upstream gradient, under the rule of fastbert.testing (error <= 2x that of
the reference computed in the input's dtype, plus a per-dtype floor), on awkward shapes, strided
views, every mask kind, fully masked rows, dropout (exact mask, reproducibility) and determinism.
"""
import math
import sys

import pytest
import torch

import fastbert
from fastbert import backends
from fastbert.testing import assert_runs_in_fresh_python

# The op family modules (``fastbert.ops.gelu`` etc. are shadowed by the functions of that name).
attention_ops = sys.modules["fastbert.ops.attention"]
gelu_ops = sys.modules["fastbert.ops.gelu"]
layer_norm_ops = sys.modules["fastbert.ops.layer_norm"]

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda"
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
OPS = ["layer_norm_fwd", "layer_norm_bwd", "add_layer_norm_fwd", "add_layer_norm_bwd",
       "bias_gelu_fwd", "bias_gelu_bwd", "geglu_fwd", "geglu_bwd", "attention_fwd", "attention_bwd", "fused_attention_fwd",
       "fused_attention_unsupported", "dropout_mask"]


def _built() -> bool:
    return backends.cuda_extension() is not None


needs_ext = pytest.mark.skipif(not _built(), reason=f"fastbert._C not built: {backends.cuda_extension_error()}")


# ----------------------------------------------------------------------------------------------
# CPU: the extension and the declared support
# ----------------------------------------------------------------------------------------------
@needs_ext
def test_extension_imports_and_registers_ops():
    import fastbert._C as ext  # noqa: F401  (loads without a GPU)

    for name in OPS:
        op = getattr(torch.ops.fastbert_cuda, name)
        assert op.default._schema.name == f"fastbert_cuda::{name}"
    seeded = torch.Tag.nondeterministic_seeded
    assert seeded in torch.ops.fastbert_cuda.attention_fwd.default.tags
    assert seeded in torch.ops.fastbert_cuda.add_layer_norm_fwd.default.tags
    # Registering the fakes and autograd formulas of every family needs no GPU.
    for family in (layer_norm_ops, gelu_ops, attention_ops):
        assert family._cuda_ops() is torch.ops.fastbert_cuda


_FRESH_COMPILE = """
import sys, torch
import fastbert
ln, ge, at = (sys.modules["fastbert.ops." + m] for m in ("layer_norm", "gelu", "attention"))
def block(x, r, w, b, q, k):
    y = ln._layer_norm_cuda(x, (x.shape[-1],), w, b, 1e-5)
    y, s = ln._add_layer_norm_cuda(y, r, w, b, 1e-5, b, 0.1, True)
    y = ge._geglu_cuda(ge._bias_gelu_cuda(y, b, "tanh"), None, "none")
    return y, s, at._sdpa_cuda(q, k, k, None, 0.0, False, None, False, None, None)
def leaf(*shape):
    return torch.empty(shape, dtype=torch.float16, device="meta").requires_grad_(True)
args = [leaf(3, 5, 64), leaf(3, 5, 64), leaf(64), leaf(64), leaf(1, 2, 9, 64), leaf(1, 2, 11, 64)]
outs = torch.compile(block, backend="aot_eager", fullgraph=True)(*args)
torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])
assert all(a.grad is not None and a.grad.shape == a.shape for a in args)
print("compiled ok")
"""


@needs_ext
def test_fullgraph_compile_before_any_eager_call():
    """The first call of the CUDA ops under torch.compile(fullgraph=True), in a fresh interpreter:
    loading the extension and registering each family's fakes / autograd run at trace time (a
    constant-result probe) instead of breaking the graph. Meta tensors (the fakes serve them), so
    forward and backward run without a GPU."""
    assert_runs_in_fresh_python(_FRESH_COMPILE, "compiled ok")


@needs_ext
def test_dropout_mask_meta_shape():
    keep = torch.ops.fastbert_cuda.dropout_mask(torch.empty(1, dtype=torch.int64, device="meta"), [3, 5], 0.1)
    assert keep.shape == (3, 5) and keep.dtype == torch.bool


@needs_ext
@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal of CPU tensors on a machine without a GPU")
def test_cuda_backend_refuses_cpu_tensors():
    x = torch.randn(4, 8)
    with pytest.raises(backends.BackendError, match="CUDA"):
        fastbert.layer_norm(x, (8,), backend="cuda")


@needs_ext
def test_fakes_and_autograd_on_meta_tensors():
    """The glue (implementation functions, fake kernels, autograd formulas) traced on meta tensors,
    which need no GPU: every output and gradient gets its input's shape, dtype and device."""
    ln, ge, at = layer_norm_ops, gelu_ops, attention_ops
    ln._cuda_ops(), ge._cuda_ops(), at._cuda_ops()

    def leaf(*shape, dtype=F16):
        return torch.empty(shape, device="meta", dtype=dtype).requires_grad_(True)

    x, r, w, b = leaf(2, 5, 768), leaf(2, 5, 768), leaf(768), leaf(768)
    q, k, v, m = leaf(2, 3, 17, 64), leaf(2, 3, 33, 64), leaf(2, 3, 33, 40), leaf(17, 33, dtype=F32)
    z = leaf(dtype=F32)
    y = ln._layer_norm_cuda(x, (768,), w, b, 1e-5)
    y2, s = ln._add_layer_norm_cuda(y, r, w, b, 1e-5, b, 0.1, True)
    y3 = ln._add_layer_norm_cuda(y, r, None, None, 1e-5, None, 0.0, False)
    g = ge._bias_gelu_cuda(y2, b, "tanh")
    g0 = ge._gelu_cuda(z, "none")
    a = at._sdpa_cuda(q, k, v, m, 0.1, True, None, False, None, None)
    # grouped-query (one K/V head for three query heads, repeated) with ALiBi and a sliding
    # window (both merged into the mask)
    k1, v1 = leaf(2, 1, 33, 64), leaf(2, 1, 33, 40)
    slopes = torch.empty(3, device="meta")
    a2 = at._sdpa_cuda(q, k1, v1, m, 0.0, False, None, True, slopes, (4, 2))  # + a window
    assert [t.shape for t in (y, y2, s, y3, g)] == [x.shape] * 5 and g0.shape == () and a.shape == (2, 3, 17, 40)
    assert a2.shape == a.shape
    outs = [g, s, a, y3, g0, a2]
    torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])
    for t in (x, r, w, b, q, k, v, m, z, k1, v1):
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == t.dtype, t.shape
    x2 = leaf(3, 97)
    _, s2 = ln._add_layer_norm_cuda(x2, x2, None, None, 1e-5, None, 0.0, True)
    s2.sum().backward()  # only the pre-norm sum is used
    assert x2.grad.shape == x2.shape
    packed, a0, g0 = leaf(4, 2, 96), leaf(), leaf()
    outs = [ge._geglu_cuda(packed, None, "tanh"), ge._geglu_cuda(a0, g0, "none")]  # packed; 0-d
    assert outs[0].shape == (4, 2, 48) and outs[1].shape == ()
    torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])
    assert packed.grad.shape == packed.shape and a0.grad.shape == g0.grad.shape == ()
    with torch.no_grad():  # the fused inference forward, dense and over packed sequences
        assert at._sdpa_cuda(q, k, k, None, 0.0, False, None, False, None, None).shape == q.shape
        qp, kp = leaf(11, 3, 64), leaf(20, 3, 64)
        cu = torch.tensor([0, 4, 11], dtype=torch.int32, device="meta")
        out = at._varlen_cuda(qp, kp, kp, cu, cu, 7, 16, 0.0, True, None, None, None, None)
        assert out.shape == qp.shape and out.dtype == qp.dtype


def test_cuda_ops_are_registered_for_dispatch():
    for op in ("layer_norm", "add_layer_norm", "gelu", "bias_gelu", "geglu",
               "scaled_dot_product_attention"):
        assert "cuda" in backends.implementations(op), op


def _reasons(op, **call):
    return backends.implementations(op)["cuda"].reasons(**call)


@pytest.mark.parametrize("op,call,needle", [
    ("layer_norm", dict(input=torch.zeros(2, 8, dtype=torch.float64)), "float64"),
    ("layer_norm", dict(input=torch.zeros(2, 8, dtype=F16), weight=torch.zeros(8)), "weight dtype"),
    ("add_layer_norm", dict(input=torch.zeros(2, 8, dtype=F16), residual=torch.zeros(2, 8, dtype=F16),
                            weight=None, bias=torch.zeros(8, dtype=F16), input_bias=torch.zeros(8)),
     "input_bias dtype"),
    ("gelu", dict(input=torch.zeros(3, dtype=torch.float64)), "float64"),
    ("bias_gelu", dict(input=torch.zeros(2, 8, dtype=BF16), bias=torch.zeros(8)), "bias dtype"),
    ("geglu", dict(input=torch.zeros(2, 8, dtype=torch.float64), gate=None), "float64"),
    ("scaled_dot_product_attention", dict(query=torch.zeros(1, 1, 2, 8, dtype=torch.float64)), "float64"),
], ids=["ln-fp64", "ln-weight-dtype", "addln-input-bias-dtype", "gelu-fp64", "biasgelu-bias-dtype",
        "geglu-fp64", "sdpa-fp64"])
def test_cuda_reasons_refuse(op, call, needle):
    reasons = _reasons(op, **call)
    assert any(needle in r for r in reasons), reasons


def test_cuda_reasons_accept_supported():
    q = torch.zeros(1, 2, 3, 40, dtype=F16)
    assert _reasons("scaled_dot_product_attention", query=q, key=q, value=q,
                    attn_mask=torch.zeros(3, 3), dropout_p=0.1, is_causal=True, scale=None) == []
    x = torch.zeros(2, 7, dtype=BF16)
    assert _reasons("layer_norm", input=x, weight=torch.zeros(7, dtype=BF16), bias=None) == []
    assert _reasons("add_layer_norm", input=x, residual=x, weight=None, bias=None,
                    input_bias=torch.zeros(7, dtype=BF16), dropout_p=0.5) == []
    assert _reasons("bias_gelu", input=x, bias=torch.zeros(7, dtype=BF16), approximate="tanh") == []
    assert _reasons("geglu", input=x, gate=x, approximate="tanh") == []
    # layer_norm under CUDA autocast: a 16-bit input (cast first) with fp32 parameters
    assert _reasons("layer_norm", input=x, weight=torch.zeros(7), bias=torch.zeros(7),
                    out_dtype=torch.float32) == []


@pytest.mark.parametrize("grad,dropout,dtype,d,lk,mask,expect", [
    (False, 0.0, F16, 64, 512, None, True),
    (False, 0.0, BF16, 128, 1, "bool", True),
    (True, 0.0, F16, 64, 128, None, False),
    (False, 0.1, F16, 64, 128, None, False),
    (False, 0.0, F32, 64, 128, None, False),
    (False, 0.0, F16, 80, 128, None, False),
    (False, 0.0, F16, 64, 513, None, False),
    (False, 0.0, F16, 64, 128, "float", True),
    (False, 0.0, F16, 64, 128, "float-grad", False),
], ids=["fp16-D64-Lk512", "bf16-D128-Lk1-bool", "grad", "dropout", "fp32", "D80", "Lk513", "float-mask",
        "float-mask-grad"])
def test_fused_attention_eligible(grad, dropout, dtype, d, lk, mask, expect):
    q = torch.zeros(1, 2, 3, d, dtype=dtype, requires_grad=grad)
    k = torch.zeros(1, 2, lk, d, dtype=dtype)
    m = None if mask is None else (torch.ones(lk, dtype=torch.bool) if mask == "bool" else torch.zeros(lk))
    if mask == "float-grad":  # a trainable bias needs the unfused path's gradient
        m.requires_grad_()
    assert attention_ops._cuda_fused_eligible(q, k, k, m, dropout) is expect


# ----------------------------------------------------------------------------------------------
# GPU: the dropout RNG shared by every kernel family
# ----------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_statistics(p):
    attention_ops._cuda_ops()
    n = 1 << 22
    seed = torch.tensor([20240601], dtype=torch.int64, device=DEV)
    keep = torch.ops.fastbert_cuda.dropout_mask(seed, [n], p).float()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.mean().item() - (1 - p)) < 6 * sigma
    # Neighbours (same and different Philox calls) are independent: P(both kept) = (1 - p)^2.
    for lag in (1, 3, 4, 5):
        both = (keep[:-lag] * keep[lag:]).mean().item()
        assert abs(both - (1 - p) ** 2) < 6 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / n)
    other = torch.ops.fastbert_cuda.dropout_mask(seed + 1, [n], p).float()
    assert abs((keep * other).mean().item() - (1 - p) ** 2) < 6 * math.sqrt((1 - p) ** 2 / n)


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["attention_fwd", "add_layer_norm_fwd"])
def test_dropout_seed_drawn_on_device(op):
    """The C++ forward ops draw their seed on the device from its default CUDA generator
    (at::randint, graph-safe): an int64 (1,) CUDA tensor equal to what torch.randint draws after
    the same torch.manual_seed, reproduced by it, fresh on the next call; (0,) without dropout."""
    attention_ops._cuda_ops()
    layer_norm_ops._cuda_ops()
    q = torch.randn(1, 2, 16, 64, device=DEV, dtype=F16)
    x = torch.randn(4, 64, device=DEV, dtype=F16)
    if op == "attention_fwd":
        def draw(p):
            return torch.ops.fastbert_cuda.attention_fwd(q, q, q, None, p, False, 0.125)[-1]
    else:
        def draw(p):
            return torch.ops.fastbert_cuda.add_layer_norm_fwd(x, x, None, None, None, 1e-5, p)[-1]
    torch.manual_seed(3)
    first = draw(0.1)
    torch.manual_seed(3)
    again = draw(0.1)
    fresh = draw(0.1)
    assert first.device == q.device and first.dtype == torch.int64 and first.shape == (1,)
    assert torch.equal(first, again) and not torch.equal(again, fresh)
    torch.manual_seed(3)
    assert torch.equal(first, torch.randint(2 ** 63 - 1, (1,), device=DEV))
    assert draw(0.0).shape == (0,)
