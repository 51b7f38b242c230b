"""fastbert's ops and optimized models under torch.autocast (fastbert/_autocast.py).

Each op under autocast must equal the same op called without autocast on its inputs cast the way
autocast casts those of the torch computation it replaces (bit for bit: the same kernels run on
the same values), return the dtype torch returns there, and give fp32 leaves their gradients in
fp32. A model rewritten by fastbert.optimize() must compute under autocast what it computed before
(same output dtype; output and gradients as close to an fp64 copy as the original model's).

Without a GPU autocast runs on CPU (fp16: the Triton interpreter's bf16 dot is wrong; the torch
backend in bf16 too), where torch leaves layer_norm alone; CUDA's rule for layer_norm (computed and
returned in fp32) is checked by switching it on for CPU (``_LAYER_NORM_FP32``). On a GPU the same
tests run under CUDA autocast, with both dtypes and every backend.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert import _autocast
from fastbert.backends import backend_reasons
from fastbert.testing import DEVICE, assert_close, rand

ON_GPU = DEVICE == "cuda"
CASES = [("torch", torch.float16), ("torch", torch.bfloat16), ("triton", torch.float16)]
if ON_GPU:
    CASES += [("triton", torch.bfloat16), ("cuda", torch.float16), ("cuda", torch.bfloat16)]
IDS = [f"{b}-{str(d).split('.')[-1]}" for b, d in CASES]
F32 = torch.float32


def _skip_unavailable(backend):
    reasons = backend_reasons(backend, torch.device(DEVICE), explicit=True)
    if reasons:
        pytest.skip(f"backend {backend!r} unavailable here: {'; '.join(reasons)}")


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _run(fn, leaves, grad_out, autocast_dtype=None):
    """(output, gradients of the leaves) of ``fn(*leaves)``, under autocast when a dtype is given."""
    if autocast_dtype is None:
        out = fn(*leaves)
    else:
        with torch.autocast(DEVICE, dtype=autocast_dtype):
            out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out, grads


def _check_cast_equivalence(fn, leaves, cast_dtypes, ac_dtype, expect_dtype):
    """``fn`` under autocast == ``fn`` without it on the leaves cast to ``cast_dtypes``, bitwise,
    gradients included (each in its leaf's dtype)."""
    probe = fn(*[t.detach().to(d) for t, d in zip(leaves, cast_dtypes)])
    grad_out = rand(probe.shape, F32, DEVICE)
    out, grads = _run(fn, leaves, grad_out, ac_dtype)
    cast_leaves = _leaves(*[t.to(d) for t, d in zip(leaves, cast_dtypes)])
    ref, ref_grads = _run(fn, cast_leaves, grad_out)
    assert out.dtype == expect_dtype, f"output dtype {out.dtype}, expected {expect_dtype}"
    assert torch.equal(out, ref)
    for i, (g, r, leaf) in enumerate(zip(grads, ref_grads, leaves)):
        assert g.dtype == leaf.dtype, f"gradient {i}: dtype {g.dtype}, leaf {leaf.dtype}"
        assert torch.equal(g, r.to(leaf.dtype)), f"gradient {i} differs"


def _torch_dtype_under_autocast(fn, *tensors, ac_dtype):
    with torch.autocast(DEVICE, dtype=ac_dtype):
        return fn(*tensors).dtype


@pytest.mark.parametrize("backend,dtype", CASES, ids=IDS)
def test_sdpa_casts_like_torch_sdpa(backend, dtype):
    _skip_unavailable(backend)
    q, k, v = (rand((2, 3, 17, 40), F32, DEVICE) for _ in range(3))
    mask = rand((1, 1, 17, 17), F32, DEVICE)  # a trainable fp32 bias: cast too, as torch does
    leaves = _leaves(q, k, v, mask)

    def fn(q, k, v, m):
        return fastbert.scaled_dot_product_attention(q, k, v, m, is_causal=True, backend=backend)
    expect = _torch_dtype_under_autocast(F.scaled_dot_product_attention,
                                         q, k, v, mask, ac_dtype=dtype)
    assert expect == dtype
    _check_cast_equivalence(fn, leaves, [dtype] * 4, dtype, expect)


@pytest.mark.parametrize("backend,dtype", CASES, ids=IDS)
def test_sdpa_bool_mask_and_fp16_inputs_under_autocast(backend, dtype):
    """A bool mask is left alone; inputs already in another low precision are cast (as torch)."""
    _skip_unavailable(backend)
    q, k, v = (rand((1, 2, 20, 16), torch.float16, DEVICE) for _ in range(3))
    keep = torch.rand((1, 1, 1, 20), device=DEVICE) < 0.7
    leaves = _leaves(q, k, v)

    def fn(q, k, v):
        return fastbert.scaled_dot_product_attention(q, k, v, keep, backend=backend)
    _check_cast_equivalence(fn, leaves, [dtype] * 3, dtype, dtype)


@pytest.mark.parametrize("backend,dtype", [c for c in CASES if c[0] != "cuda"],
                         ids=[i for c, i in zip(CASES, IDS) if c[0] != "cuda"])
def test_varlen_and_block_sparse_cast_like_sdpa(backend, dtype):
    _skip_unavailable(backend)
    lens = [5, 0, 17]
    cu = torch.tensor([0, 5, 5, 22], dtype=torch.int32, device=DEVICE)
    q, k, v = (rand((22, 2, 16), F32, DEVICE) for _ in range(3))

    def varlen(q, k, v):
        return fastbert.varlen_attention(q, k, v, cu, cu, max(lens), max(lens), is_causal=True,
                                         backend=backend)
    _check_cast_equivalence(varlen, _leaves(q, k, v), [dtype] * 3, dtype, dtype)

    layout = fastbert.sparsity.sliding_window(33, 16, window=1, device=DEVICE)
    q, k, v = (rand((1, 2, 33, 16), F32, DEVICE) for _ in range(3))

    def block_sparse(q, k, v):
        return fastbert.block_sparse_attention(q, k, v, layout, 16, backend=backend)
    _check_cast_equivalence(block_sparse, _leaves(q, k, v), [dtype] * 3, dtype, dtype)


@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared"])
@pytest.mark.parametrize("backend,dtype", CASES, ids=IDS)
def test_linformer_casts_inputs_and_projections(backend, dtype, shared):
    _skip_unavailable(backend)
    q, k, v = (rand((2, 2, 19, 16), F32, DEVICE) for _ in range(3))
    pk, pv = rand((8, 19), F32, DEVICE), rand((8, 19), F32, DEVICE)
    pad = torch.zeros((2, 19), dtype=torch.bool, device=DEVICE)
    pad[1, 12:] = True
    if shared:
        leaves = _leaves(q, k, v, pk)

        def fn(q, k, v, p):
            return fastbert.linformer_attention(q, k, v, p, p, pad, backend=backend)
    else:
        leaves = _leaves(q, k, v, pk, pv)

        def fn(q, k, v, pk, pv):
            return fastbert.linformer_attention(q, k, v, pk, pv, pad, backend=backend)
    _check_cast_equivalence(fn, leaves, [dtype] * len(leaves), dtype, dtype)


@pytest.fixture(params=["device", "cuda_rule"])
def layer_norm_rule(request, monkeypatch):
    """The layer_norm rule under test: the device's own, or (without a GPU) CUDA's, switched on
    for CPU: computed and returned in fp32."""
    if request.param == "cuda_rule":
        if ON_GPU:
            pytest.skip("on a GPU the device's own rule is CUDA's")
        monkeypatch.setattr(_autocast, "_LAYER_NORM_FP32", ("cuda", "cpu"))
    return DEVICE in _autocast._LAYER_NORM_FP32 or request.param == "cuda_rule"


@pytest.mark.parametrize("backend,dtype", CASES, ids=IDS)
def test_layer_norm_under_autocast(backend, dtype, layer_norm_rule):
    """A low-precision input with fp32 parameters: fp32 on CUDA (as F.layer_norm under autocast
    there), the input's dtype on CPU."""
    _skip_unavailable(backend)
    x = rand((5, 97), dtype, DEVICE)
    w, b = rand((97,), F32, DEVICE), rand((97,), F32, DEVICE)
    leaves = _leaves(x, w, b)

    def fn(x, w, b):
        return fastbert.layer_norm(x, (97,), w, b, backend=backend)
    ln_dtype = F32 if layer_norm_rule else dtype
    if not layer_norm_rule:
        assert _torch_dtype_under_autocast(lambda *t: F.layer_norm(t[0], (97,), *t[1:]), x, w, b,
                                           ac_dtype=dtype) == dtype
    _check_cast_equivalence(fn, leaves, [ln_dtype, F32, F32], dtype, ln_dtype)


@pytest.mark.parametrize("return_residual", [False, True], ids=["out", "with_sum"])
@pytest.mark.parametrize("residual_dtype", ["fp32", "low"])
@pytest.mark.parametrize("backend,dtype", CASES, ids=IDS)
def test_add_layer_norm_under_autocast(backend, dtype, residual_dtype, return_residual,
                                       layer_norm_rule):
    """A Linear's low-precision output plus an fp32 (or low-precision) residual stream, with the
    Linear's fp32 bias as input_bias: summed in the promoted dtype, normalised in fp32 on CUDA."""
    _skip_unavailable(backend)
    rdt = F32 if residual_dtype == "fp32" else dtype
    x, r = rand((6, 64), dtype, DEVICE), rand((6, 64), rdt, DEVICE)
    w, b, xb = (rand((64,), F32, DEVICE) for _ in range(3))
    leaves = _leaves(x, r, w, b, xb)
    sum_dtype = torch.promote_types(dtype, rdt)
    ln_dtype = F32 if layer_norm_rule else sum_dtype

    def fn(x, r, w, b, xb):
        out = fastbert.add_layer_norm(x, r, w, b, input_bias=xb, return_residual=return_residual,
                                      backend=backend)
        if not return_residual:
            return out
        out, s = out
        if torch.is_autocast_enabled(DEVICE):
            assert s.dtype == sum_dtype
        return out + s.to(sum_dtype).to(out.dtype)  # both enter the gradient check
    _check_cast_equivalence(fn, leaves, [ln_dtype, ln_dtype, F32, F32, ln_dtype], dtype, ln_dtype)


@pytest.mark.parametrize("backend,dtype", CASES, ids=IDS)
def test_bias_gelu_keeps_the_input_dtype(backend, dtype):
    """bias_gelu after a Linear under autocast: the bias is that Linear's (fp32 parameter), the
    result in the Linear's output dtype, as Linear(bias) + GELU gives."""
    _skip_unavailable(backend)
    x, bias = rand((4, 33), dtype, DEVICE), rand((33,), F32, DEVICE)
    with torch.autocast(DEVICE, dtype=dtype):
        out = fastbert.bias_gelu(x, bias, backend=backend)
    assert out.dtype == dtype
    assert torch.equal(out, fastbert.bias_gelu(x, bias, backend=backend))


def test_mismatched_dtypes_without_autocast():
    """Without autocast nothing is cast: attention still wants one dtype; add_layer_norm promotes
    an input and a residual of two dtypes, as torch's ``+`` (see test_layer_norm.py)."""
    x, r = rand((2, 8), torch.float16, DEVICE), rand((2, 8), F32, DEVICE)
    with pytest.raises(TypeError, match="dtype"):
        fastbert.scaled_dot_product_attention(x[None, None], r[None, None], r[None, None])
    assert fastbert.add_layer_norm(x, r, None, None).dtype == F32


def test_add_layer_norm_compiles_under_autocast():
    """torch.compile(fullgraph=True) traces the casts with the op: same result as eager."""
    backend = "triton" if not backend_reasons("triton", torch.device(DEVICE)) else "torch"
    x, r = rand((4, 48), torch.float16, DEVICE), rand((4, 48), F32, DEVICE)
    w, b, xb = (rand((48,), F32, DEVICE) for _ in range(3))

    def fn(x, r, w, b, xb):
        with torch.autocast(DEVICE, dtype=torch.float16):
            return fastbert.add_layer_norm(x, r, w, b, input_bias=xb, backend=backend)
    assert torch.equal(torch.compile(fn, fullgraph=True)(x, r, w, b, xb), fn(x, r, w, b, xb))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
@pytest.mark.parametrize("backend,dtype", CASES, ids=IDS)
def test_modules_under_autocast_match_torch_modules(backend, dtype, norm_first):
    """fastbert.nn.TransformerEncoderLayer / MultiheadAttention / LayerNorm under autocast: the
    dtypes torch's modules give there, and outputs as close to an fp64 copy as theirs."""
    _skip_unavailable(backend)
    import fastbert.nn as fnn

    torch.manual_seed(0)
    pairs = [(torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True,
                                               norm_first=norm_first, device=DEVICE),
              fnn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True,
                                          norm_first=norm_first, device=DEVICE, backend=backend)),
             (torch.nn.MultiheadAttention(64, 4, batch_first=True, device=DEVICE),
              fnn.MultiheadAttention(64, 4, batch_first=True, device=DEVICE, backend=backend)),
             (torch.nn.LayerNorm(64, device=DEVICE), fnn.LayerNorm(64, device=DEVICE, backend=backend))]
    x = rand((2, 9, 64), F32, DEVICE)
    pad = torch.zeros((2, 9), dtype=torch.bool, device=DEVICE)
    pad[1, 6:] = True
    for theirs, ours in pairs:
        ours.load_state_dict(theirs.state_dict())
        ref = copy.deepcopy(theirs).double()
        if isinstance(theirs, torch.nn.TransformerEncoderLayer):
            def call(m, x):
                return m(x, src_key_padding_mask=pad)
        elif isinstance(theirs, torch.nn.MultiheadAttention):
            def call(m, x):
                return m(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        else:  # a LayerNorm of a low-precision activation (fp32 parameters)
            def call(m, x):
                return m(x if m is ref else x.to(dtype))
        with torch.autocast(DEVICE, dtype=dtype):
            a, b = call(theirs, x), call(ours, x)
        r = call(ref, x.to(dtype).double() if isinstance(theirs, torch.nn.LayerNorm) else x.double())
        name = type(theirs).__name__
        assert b.dtype == a.dtype, f"{name}: {b.dtype}, torch's {a.dtype}"
        assert_close(b[~pad], r[~pad], a[~pad], atol=1e-3, name=name)


# ------------------------------------------------------------------------ optimized models
transformers = pytest.importorskip("transformers")


def _bert(dtype=F32):
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128,
                                  max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.BertModel(cfg).to(DEVICE, dtype).train()


@pytest.mark.parametrize("backend,dtype", CASES, ids=IDS)
def test_optimized_bert_under_autocast(backend, dtype, monkeypatch):
    """An optimized BERT under autocast: the original's output dtype, and output and parameter
    gradients as close to the fp64 model as the original under autocast is (2x its error)."""
    _skip_unavailable(backend)
    monkeypatch.setenv("FASTBERT_BACKEND", backend)
    model = _bert()
    ref = copy.deepcopy(model).double()
    fast = copy.deepcopy(model)
    fastbert.optimize(fast)
    ids = torch.randint(0, 99, (3, 13), device=DEVICE)
    attn = torch.ones((3, 13), dtype=torch.long, device=DEVICE)
    attn[1, 9:] = 0
    real = attn.bool()
    outs = {}
    for name, m in (("torch", model), ("fast", fast), ("ref", ref)):
        if name == "ref":
            out = m(ids, attention_mask=attn).last_hidden_state
        else:
            with torch.autocast(DEVICE, dtype=dtype):
                out = m(ids, attention_mask=attn).last_hidden_state
        if name == "torch":
            grad_out = rand(out.shape, F32, DEVICE)
        out.backward(grad_out.to(out.dtype))
        outs[name] = out
    assert outs["fast"].dtype == outs["torch"].dtype
    assert_close(outs["fast"][real], outs["ref"][real], outs["torch"][real], atol=1e-3,
                 name="last_hidden_state")
    params = {n: dict(m.named_parameters()) for n, m in (("torch", model), ("fast", fast), ("ref", ref))}
    for name, p in params["fast"].items():
        if p.grad is None or name.endswith("key.bias"):  # dL/d(key bias) is 0 in exact arithmetic
            continue
        assert_close(p.grad, params["ref"][name].grad, params["torch"][name].grad, atol=1e-3,
                     name=f"grad {name}")
