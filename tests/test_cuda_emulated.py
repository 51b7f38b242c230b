"""backend="cuda": the CUDA C++ kernels of csrc/, run on the CPU by the emulator in tests/cuda_emu.

CI has no GPU, so without this file csrc/ would only be compiled there. tests/cuda_emu/build.py
compiles every csrc file as C++ against tests/cuda_emu/cuda_emu.h, which runs each block's threads
as fibers with __syncthreads, __syncwarp, warp shuffles and WMMA emulated, in the most adversarial
order a GPU may choose between two barriers (one thread runs to its next barrier before the next
thread starts). The binding (csrc/fastbert.cpp) is the same code, registered as
torch.ops.fastbert_emu.* for CPU tensors, and the Python glue of backend="cuda" (the registered
implementation functions, their autograd formulas) runs on top of it. So these tests check the
kernels' indexing, strides, reductions, masking, dropout rule, barriers and launch configurations
(block sizes against __launch_bounds__, shared memory against an H100's limits) against
fastbert.reference in fp64, with every gradient, under the tolerance rule of fastbert.testing.
Every allocation is filled with NaN first (torch's fill_uninitialized_memory), so an output element
a kernel leaves unwritten fails the test.

What they cannot show: that nvcc compiles the kernels to the same thing (the GPU's fast math,
fp16 / bf16 conversions and tensor cores round slightly differently), speed, or anything about
memory ordering between blocks. The ``cuda``-marked tests in test_layer_norm.py, test_gelu.py and
test_attention.py run the same kernels on a GPU.
"""
import shutil
import sys
from pathlib import Path

import pytest
import torch

from fastbert import reference
from fastbert.testing import assert_close, compare_to_reference, rand

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
import build as cuda_emu  # noqa: E402  (tests/cuda_emu/build.py)

# The op family modules (``fastbert.ops.gelu`` etc. are shadowed by the functions of that name).
attention_ops = sys.modules["fastbert.ops.attention"]
gelu_ops = sys.modules["fastbert.ops.gelu"]
layer_norm_ops = sys.modules["fastbert.ops.layer_norm"]
FAMILIES = (layer_norm_ops, gelu_ops, attention_ops)

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
DTYPES = [F32, F16, BF16]
_REGISTERED = []


def _toolchain_missing():
    if shutil.which("c++") is None:
        return "no C++ compiler (c++) to build the CUDA emulator"
    try:
        cuda_emu.cuda_include()
    except RuntimeError as e:
        return str(e)
    return None


@pytest.fixture(scope="module", params=["forward", "reverse"])
def emu(request):
    """torch.ops.fastbert_emu, with each family's glue registered on it and the families'
    ``_cuda_ops`` pointing at it (so their backend="cuda" implementations run emulated). Every test
    runs twice: with each block's threads run first to last, then last to first (a thread that
    reads what another writes without a barrier between gets a stale value in one of the two)."""
    missing = _toolchain_missing()
    if missing:
        pytest.skip(missing)
    cuda_emu.build()
    ops = torch.ops.fastbert_emu
    if not _REGISTERED:
        for family in FAMILIES:
            family._register_cuda_ops("fastbert_emu")
        _REGISTERED.append(True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTBERT_EMU_ORDER", request.param)
        for family in FAMILIES:
            mp.setattr(family, "_cuda_ops", lambda: ops)
        yield ops


@pytest.fixture(autouse=True)
def _nan_filled_allocations():
    """Every new tensor (the binding's outputs included) starts as NaN: unwritten outputs show."""
    det = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(det)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def _seed_of_next_draw(seed):
    """The dropout seed the binding draws after torch.manual_seed(seed): at::randint(2^63 - 1, {1})
    on the CPU generator, reproduced here."""
    torch.manual_seed(seed)
    return torch.randint(torch.iinfo(torch.int64).max, (1,))


# ----------------------------------------------------------------------------------------------
# The emulator itself
# ----------------------------------------------------------------------------------------------
def test_rewrite_of_cuda_syntax():
    src = ("template <typename T>\n__global__ void __launch_bounds__(256, 2)\nk(const P p) {\n"
           "  extern __shared__ __align__(128) unsigned char smem_raw[];\n}\n"
           "void f() {\n  k<T, 4><<<dim3(a, b), 128, smem,\n      stream>>>(p, q);\n}\n")
    out = cuda_emu.rewrite(src)
    assert "__global__ void k(const P p) { ::emu::check_launch_bounds(256);" in out
    assert "unsigned char* smem_raw = reinterpret_cast<unsigned char*>(::emu::dynamic_smem());" in out
    assert "::emu::launch(::emu::Config(dim3(a, b), 128, smem,\n      stream), k<T, 4>, p, q);" in out
    assert "<<<" not in out and "__launch_bounds__" not in out


# ----------------------------------------------------------------------------------------------
# LayerNorm and add + LayerNorm (csrc/layer_norm)
# ----------------------------------------------------------------------------------------------
def _layer_norm(shape):
    def fn(x, w, b, backend, **kw):
        if backend == "emu":
            return layer_norm_ops._layer_norm_cuda(x, shape, w, b, 1e-5)
        return reference.layer_norm(x, shape, w, b, 1e-5, **kw)
    return fn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1, 7, 97, 768, 1000, 1024, 4096])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm(emu, width, dtype, affine):
    rows = 3 if width >= 4096 else 17
    x = rand((rows, width), dtype, "cpu", scale=2.0) + 0.5
    w = rand((width,), dtype, "cpu") if affine else None
    b = rand((width,), dtype, "cpu") if affine else None
    compare_to_reference(_layer_norm((width,)), [x, w, b], [rand((rows, width), dtype, "cpu")], dtype,
                         f"layer_norm {width}", backend="emu")


@pytest.mark.parametrize("view", ["cols_768_of_1024", "cols_97_of_100", "every_other_row"])
def test_layer_norm_views(emu, view):
    if view == "cols_768_of_1024":
        x = rand((33, 1024), F16, "cpu")[:, :768]
    elif view == "cols_97_of_100":
        x = rand((33, 100), F16, "cpu")[:, 3:]
    else:
        x = rand((66, 768), F16, "cpu")[::2]
    n = x.shape[-1]
    compare_to_reference(_layer_norm((n,)), [x, rand((n,), F16, "cpu"), rand((n,), F16, "cpu")],
                         [rand(x.shape, F16, "cpu")], F16, f"layer_norm {view}", backend="emu")


def test_layer_norm_rows(emu):
    """Many rows of a narrow width (several rows per block, a partial last block), fp16 with
    large magnitudes."""
    x = rand((130, 97), F16, "cpu", scale=300.0) + 1000.0
    compare_to_reference(_layer_norm((97,)), [x, None, None], [rand((130, 97), F16, "cpu")], F16,
                         "layer_norm 130 rows", backend="emu")


def _add_layer_norm(dropout_p=0.0, return_residual=False, keep=None, seed=0):
    def fn(x, r, w, b, xb, backend, **kw):
        if backend == "emu":
            torch.manual_seed(seed)
            return layer_norm_ops._add_layer_norm_cuda(x, r, w, b, 1e-5, xb, dropout_p, return_residual)
        return reference.add_layer_norm(x, r, w, b, 1e-5, input_bias=xb, dropout_p=dropout_p,
                                        return_residual=return_residual, dropout_mask=keep, **kw)
    return fn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [7, 97, 768, 1024])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("return_residual", [False, True])
def test_add_layer_norm(emu, width, dtype, dropout_p, return_residual):
    rows = 19
    x, r = rand((rows, width), dtype, "cpu"), rand((rows, width), dtype, "cpu")
    w, b = rand((width,), dtype, "cpu") * 0.5 + 1.0, rand((width,), dtype, "cpu")
    xb = rand((width,), dtype, "cpu")
    keep = None
    if dropout_p > 0:
        keep = emu.dropout_mask(_seed_of_next_draw(7), [rows, width], dropout_p)
    dys = [rand((rows, width), dtype, "cpu")] + ([rand((rows, width), dtype, "cpu")] if return_residual else [])
    compare_to_reference(_add_layer_norm(dropout_p, return_residual, keep, seed=7), [x, r, w, b, xb], dys,
                         dtype, f"add_layer_norm {width} p={dropout_p}", backend="emu")


def test_add_layer_norm_without_affine_or_input_bias(emu):
    x, r = rand((5, 768), F16, "cpu"), rand((5, 768), F16, "cpu")
    compare_to_reference(_add_layer_norm(), [x, r, None, None, None], [rand((5, 768), F16, "cpu")], F16,
                         "add_layer_norm plain", backend="emu")


# ----------------------------------------------------------------------------------------------
# bias + GELU (csrc/gelu)
# ----------------------------------------------------------------------------------------------
def _bias_gelu(approximate):
    def fn(x, b, backend, **kw):
        if backend == "emu":
            if b is None:
                return gelu_ops._gelu_cuda(x, approximate)
            return gelu_ops._bias_gelu_cuda(x, b, approximate)
        return reference.bias_gelu(x, b, approximate, **kw)
    return fn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1, 7, 97, 768, 3072])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu(emu, width, dtype, approximate, with_bias):
    rows = 4 if width >= 3072 else 17
    x = rand((rows, width), dtype, "cpu", scale=2.0)
    b = rand((width,), dtype, "cpu") if with_bias else None
    compare_to_reference(_bias_gelu(approximate), [x, b], [rand((rows, width), dtype, "cpu")], dtype,
                         f"bias_gelu {width} {approximate}", backend="emu")


def test_bias_gelu_views_and_shapes(emu):
    x = rand((3, 5, 200), F16, "cpu")[..., 1:98]  # (3, 5, 97) with a row stride of 200
    compare_to_reference(_bias_gelu("tanh"), [x, rand((97,), F16, "cpu")], [rand((3, 5, 97), F16, "cpu")],
                         F16, "bias_gelu view", backend="emu")
    compare_to_reference(_bias_gelu("none"), [rand((), F32, "cpu"), None], [rand((), F32, "cpu")], F32,
                         "gelu 0-d", backend="emu")


# ----------------------------------------------------------------------------------------------
# Attention (csrc/attention): the unfused path (GEMMs around the softmax kernels) with gradients,
# and the fused tensor-core forward for inference
# ----------------------------------------------------------------------------------------------
def _mask(kind, b, h, lq, lk, dtype):
    """A mask of `kind`; the bool ones leave whole rows (and a whole batch entry) without keys."""
    if kind == "none":
        return None
    if kind == "key_padding":  # (B, 1, 1, Lk); the last batch entry sees no key when B > 1
        lengths = torch.randint(1, lk + 1, (b,))
        if b > 1:
            lengths[-1] = 0
        return (torch.arange(lk)[None, :] < lengths[:, None])[:, None, None, :]
    if kind == "bool":  # (B, H, Lq, Lk), every third query row fully masked
        m = torch.rand(b, h, lq, lk) < 0.7
        m[:, :, ::3] = False
        return m
    if kind == "float":  # (1, 1, Lq, Lk) additive, in the inputs' dtype (trainable: gets a gradient)
        return rand((1, 1, lq, lk), dtype, "cpu")
    if kind == "float32":  # (B, 1, Lq, Lk) additive fp32 with -inf entries
        m = rand((b, 1, lq, lk), F32, "cpu")
        m[..., ::2, 0] = float("-inf")
        return m
    raise ValueError(kind)


def _sdpa(dropout_p=0.0, is_causal=False, scale=None, keep=None, seed=0, enable_gqa=False,
          alibi_slopes=None, window_size=None):
    def fn(q, k, v, m, backend, **kw):
        if backend == "emu":
            torch.manual_seed(seed)
            return attention_ops._sdpa_cuda(q, k, v, m, dropout_p, is_causal, scale, enable_gqa,
                                            alibi_slopes, window_size)
        return reference.scaled_dot_product_attention(
            q, k, v, m, dropout_p, is_causal, scale, enable_gqa, alibi_slopes=alibi_slopes,
            window_size=window_size, dropout_mask=keep, **kw)
    return fn


def _qkv(b, h, lq, lk, d, dtype, hkv=None, dv=None):
    hkv = hkv or h
    return (rand((b, h, lq, d), dtype, "cpu"), rand((b, hkv, lk, d), dtype, "cpu"),
            rand((b, hkv, lk, dv or d), dtype, "cpu"))


ATTN_SHAPES = [(1, 1, 1, 1, 16), (2, 3, 17, 20, 40), (1, 2, 97, 130, 80), (2, 1, 130, 97, 96)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask", ["none", "key_padding", "bool", "float", "float32"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_attention(emu, shape, dtype, mask, is_causal):
    b, h, lq, lk, d = shape
    if mask == "float32" and dtype == F32:
        pytest.skip("an fp32 mask with fp32 inputs is the 'float' case")
    q, k, v = _qkv(b, h, lq, lk, d, dtype)
    m = _mask(mask, b, h, lq, lk, dtype)
    compare_to_reference(_sdpa(is_causal=is_causal), [q, k, v, m], [rand((b, h, lq, d), dtype, "cpu")], dtype,
                         f"attention {shape} {mask}", backend="emu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout_p", [0.2, 0.6])
def test_attention_dropout(emu, dtype, dropout_p):
    b, h, lq, lk, d = 2, 2, 33, 40, 64
    q, k, v = _qkv(b, h, lq, lk, d, dtype)
    m = _mask("key_padding", b, h, lq, lk, dtype)
    keep = emu.dropout_mask(_seed_of_next_draw(11), [b, h, lq, lk], dropout_p)
    compare_to_reference(_sdpa(dropout_p=dropout_p, keep=keep, seed=11), [q, k, v, m],
                         [rand((b, h, lq, d), dtype, "cpu")], dtype, f"attention dropout {dropout_p}",
                         backend="emu")


def test_attention_views_gqa_alibi_window(emu):
    """(B, L, H, D) tensors viewed as (B, H, L, D); grouped-query heads; ALiBi and a window."""
    b, lq, lk, h, d = 2, 19, 23, 4, 40
    q = rand((b, lq, h, d), F16, "cpu").transpose(1, 2)
    k = rand((b, lk, 2, d), F16, "cpu").transpose(1, 2)
    v = rand((b, lk, 2, d), F16, "cpu").transpose(1, 2)
    slopes = torch.rand(h) * 0.5
    fn = _sdpa(enable_gqa=True, alibi_slopes=slopes, window_size=(5, 2))
    compare_to_reference(fn, [q, k, v, None], [rand((b, h, lq, d), F16, "cpu")], F16, "attention gqa",
                         backend="emu")


def test_attention_lq_and_dv_differ(emu):
    q, k, v = _qkv(1, 2, 5, 70, 32, F32, dv=24)
    compare_to_reference(_sdpa(scale=0.3), [q, k, v, None], [rand((1, 2, 5, 24), F32, "cpu")], F32,
                         "attention dv != d", backend="emu")


@pytest.mark.parametrize("path", ["unfused", "fused"])
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_attention_nan_propagates(emu, path, dtype):
    """A NaN input makes the rows it reaches NaN, as in torch's SDPA, and leaves the others exact:
    a row whose every live logit is NaN must not come out as a fully masked row (0)."""
    b, h, lq, lk, d = 1, 3, 9, 20, 64
    q, k, v = _qkv(b, h, lq, lk, d, dtype)
    q[0, 0, 3, 5] = float("nan")  # every logit of row 3 of head 0
    k[0, 1, 7, 0] = float("nan")  # one logit of every row of head 1
    m = torch.ones(b, 1, lq, lk, dtype=torch.bool)
    m[0, 0, 4] = False            # a fully masked row stays 0
    m[0, 0, 3, 10:] = False       # row 3: NaN logits among masked keys
    if path == "fused":
        assert emu.fused_attention_unsupported(q, k, v, m) == ""
        out = emu.fused_attention_fwd(q, k, v, m, False, d ** -0.5)
    else:
        out = emu.attention_fwd(q, k, v, m, 0.0, False, d ** -0.5)[0]
    ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), m)
    low = reference.scaled_dot_product_attention(q, k, v, m, compute_dtype=dtype)
    assert ref[0, 0, 3].isnan().all() and ref[0, 1, :4].isnan().all() and not ref[0, 2].isnan().any()
    assert torch.equal(out.isnan(), ref.isnan()), f"NaN pattern differs: {out.isnan().nonzero().tolist()}"
    assert (out[0, 0, 4] == 0).all()
    assert_close(out.nan_to_num(0.0), ref.nan_to_num(0.0), low.nan_to_num(0.0), name=f"{path} non-NaN rows")


FUSED_SHAPES = [(1, 2, 17, 20, 64), (2, 1, 70, 130, 64), (1, 1, 64, 512, 128), (1, 1, 5, 1, 128),
                (1, 1, 130, 64, 64)]


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask", ["none", "key_padding", "bool"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_fused_attention(emu, shape, dtype, mask, is_causal):
    """Inference without dropout, fp16 / bf16, D 64 / 128, Lk <= 512, no or a bool mask: the
    fused tensor-core kernel serves it (WMMA emulated as whole 16x16x16 tiles, fp32 sums)."""
    b, h, lq, lk, d = shape
    q, k, v = _qkv(b, h, lq, lk, d, dtype)
    m = _mask(mask, b, h, lq, lk, dtype)
    assert emu.fused_attention_unsupported(q, k, v, m) == ""
    with torch.no_grad():
        out = attention_ops._sdpa_cuda(q, k, v, m, 0.0, is_causal, None, False, None, None)
    ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), m, is_causal=is_causal)
    low = reference.scaled_dot_product_attention(q, k, v, m, is_causal=is_causal, compute_dtype=dtype)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close(out, ref, low, name=f"fused attention {shape} {mask}")


def test_fused_attention_views(emu):
    """(B, L, H, D) views (strides multiples of 8 elements) run without a copy; an odd-offset view
    is copied by the binding first. Both must match."""
    b, l, h, d = 2, 40, 3, 64
    base = rand((b, l, h, d + 8), F16, "cpu")
    q = base[..., :d].transpose(1, 2)
    k = rand((b, l, h, d), F16, "cpu").transpose(1, 2)
    v = rand((b * l * h * d + 1,), F16, "cpu")[1:].view(b, l, h, d).transpose(1, 2)  # 2-byte offset
    with torch.no_grad():
        out = attention_ops._sdpa_cuda(q, k, v, None, 0.0, False, None, False, None, None)
    ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double())
    low = reference.scaled_dot_product_attention(q, k, v, compute_dtype=F16)
    assert_close(out, ref, low, name="fused attention views")


# ----------------------------------------------------------------------------------------------
# Dropout mask (the rule every kernel family uses)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask(emu, p):
    seed = torch.tensor([123456789123])
    keep = emu.dropout_mask(seed, [997, 13], p)
    n = keep.numel()
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 4.5 * (p * (1 - p) / n) ** 0.5
    assert torch.equal(keep, emu.dropout_mask(seed, [997, 13], p))
    assert not torch.equal(keep, emu.dropout_mask(seed + 1, [997, 13], p))
