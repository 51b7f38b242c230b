"""Bad input to the public API gets a clear error, never a crash from deep inside torch / triton.

Each case asserts the exception type (TypeError / ValueError naming the argument, NotImplementedError
with a reason, or fastbert.backends.BackendError when an explicitly requested backend cannot serve the
call) and a ``match=`` on the argument's name. The functional ops are tried with backend="torch" and
backend="triton" (Triton runs under TRITON_INTERPRET=1 without a GPU; the shapes are tiny and most
errors are raised before any kernel launch). tests/test_api.py holds the first round of these checks;
the cases here are the ones it does not cover. A few inputs that are valid but degenerate (empty
sequences, numpy integers, keys of length 0 with need_weights) are checked to give the right answer.

Tensors for the ops and modules live on fastbert.testing.DEVICE (on a GPU machine the Triton backend
runs compiled there); unpad/pad_input stay on the CPU, where out-of-range indices are checked (on
CUDA, index_copy_ checks them with a device-side assert, which would end the test session).
"""
import numpy as np
import pytest
import torch
from torch.nn.attention.bias import causal_upper_left

import fastbert
import fastbert.nn as fnn
from fastbert import sparsity as S
from fastbert.testing import DEVICE

BACKENDS = ["torch", "triton"]
f32 = torch.float32


def t(*shape, dtype=f32, device=DEVICE):
    return torch.randn(*shape, dtype=dtype, device=device)


def meta(x):
    return x.to("meta")


# Inputs shared by the cases (tiny; the head dim 16 is one the Triton kernels take).
Q, K, V = t(2, 2, 5, 16), t(2, 2, 7, 16), t(2, 2, 7, 16)
P = t(10, 2, 16)                                     # packed (total, H, D)
CU = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)  # lengths of 2 sequences
QB = t(1, 2, 20, 16)                                 # block-sparse: 2 blocks of 16
LAY = torch.ones(1, 2, 2, dtype=torch.bool, device=DEVICE)
E = t(3, 7)                                          # Linformer projection (k = 3, Lk = 7)
X = t(4, 16)
BOOL_MASK = torch.ones(5, 7, dtype=torch.bool, device=DEVICE)


def ones(*shape, dtype=f32):
    return torch.ones(*shape, dtype=dtype, device=DEVICE)


def zeros(*shape, dtype=f32):
    return torch.zeros(*shape, dtype=dtype, device=DEVICE)

sdpa = fastbert.scaled_dot_product_attention
va = fastbert.varlen_attention
bsa = fastbert.block_sparse_attention
la = fastbert.linformer_attention
ln = fastbert.layer_norm
aln = fastbert.add_layer_norm


def _sdpa(**kw):
    args = {"query": Q, "key": K, "value": V}
    args.update(kw)
    return lambda backend: sdpa(**args, backend=backend)


def _va(q=P, k=P, v=P, cq=CU, ck=CU, mq=6, mk=6, **kw):
    return lambda backend: va(q, k, v, cq, ck, mq, mk, **kw, backend=backend)


def _bsa(q=QB, k=QB, v=QB, layout=LAY, block_size=16, **kw):
    return lambda backend: bsa(q, k, v, layout, block_size, **kw, backend=backend)


def _la(q=Q, k=K, v=V, pk=E, pv=E, **kw):
    return lambda backend: la(q, k, v, pk, pv, **kw, backend=backend)


def _ln(x=X, shape=16, *args, **kw):
    return lambda backend: ln(x, shape, *args, **kw, backend=backend)


def _aln(x=X, r=X, w=None, b=None, **kw):
    return lambda backend: aln(x, r, w, b, **kw, backend=backend)


def _gelu(x=X, *args):
    return lambda backend: fastbert.gelu(x, *args, backend=backend)


def _bias_gelu(x=X, bias=None):
    return lambda backend: fastbert.bias_gelu(x, bias, backend=backend)


def _geglu(x=X, gate=None, *args):
    return lambda backend: fastbert.geglu(x, gate, *args, backend=backend)


# (id, call taking the backend, exception, match)
OP_CASES = [
    # ---------------------------------------------------------------- scaled_dot_product_attention
    ("sdpa-query-None", _sdpa(query=None), TypeError, "query must be a torch.Tensor, got NoneType"),
    ("sdpa-key-numpy", _sdpa(key=K.cpu().numpy()), TypeError, "key must be a torch.Tensor, got numpy.ndarray"),
    ("sdpa-value-list", _sdpa(value=V.tolist()), TypeError, "value must be a torch.Tensor, got list"),
    ("sdpa-complex", _sdpa(query=Q.to(torch.complex64)), TypeError, "query must be a floating-point"),
    ("sdpa-head-dim-0", _sdpa(query=Q[..., :0], key=K[..., :0]), ValueError, "head dim D must be >= 1"),
    ("sdpa-key-meta", _sdpa(key=meta(K)), ValueError, "key is on meta but query is on " + DEVICE),
    ("sdpa-value-meta-3d", lambda be: sdpa(Q[0], K[0], meta(V[0]), backend=be), ValueError,
     "value is on meta"),
    ("sdpa-mask-meta", _sdpa(attn_mask=meta(BOOL_MASK)), ValueError, "attn_mask is on meta"),
    ("sdpa-mask-0dim", _sdpa(attn_mask=torch.tensor(True, device=DEVICE)), ValueError,
     "attn_mask must have at least 1 dim"),
    ("sdpa-mask-0dim-float", _sdpa(attn_mask=torch.tensor(0.5, device=DEVICE)), ValueError,
     "attn_mask must have at least 1 dim"),
    ("sdpa-mask-5d", _sdpa(attn_mask=BOOL_MASK.expand(1, 2, 2, 5, 7)), ValueError,
     r"attn_mask of shape \(1, 2, 2, 5, 7\) does not broadcast"),
    ("sdpa-5d-query-mask-mismatch",
     lambda be: sdpa(Q[None], K[None], V[None], attn_mask=ones(3, 2, 5, 7, dtype=torch.bool),
                     backend=be),
     ValueError, r"attn_mask of shape \(3, 2, 5, 7\) does not broadcast to \(\.\.\., H, Lq, Lk\)"),
    ("sdpa-mask-complex", _sdpa(attn_mask=zeros(5, 7, dtype=torch.complex64)), TypeError,
     "attn_mask must be a bool tensor"),
    ("sdpa-mask-uint8", _sdpa(attn_mask=ones(5, 7, dtype=torch.uint8)), TypeError,
     "attn_mask must be a bool tensor"),
    ("sdpa-mask-numpy", _sdpa(attn_mask=np.ones((5, 7), dtype=bool)), TypeError,
     "attn_mask must be a torch.Tensor or None, got numpy.ndarray"),
    ("sdpa-scale-nan", _sdpa(scale=float("nan")), ValueError, "scale must be a finite positive"),
    ("sdpa-scale-inf", _sdpa(scale=float("inf")), ValueError, "scale must be a finite positive"),
    ("sdpa-scale-negative", _sdpa(scale=-1.0), ValueError, "scale must be a finite positive"),
    ("sdpa-scale-tensor", _sdpa(scale=torch.tensor(0.5)), TypeError, "scale must be a float or None"),
    ("sdpa-dropout-nan", _sdpa(dropout_p=float("nan")), ValueError, r"dropout_p must be in \[0, 1\]"),
    ("sdpa-dropout-inf", _sdpa(dropout_p=float("inf")), ValueError, r"dropout_p must be in \[0, 1\]"),
    ("sdpa-dropout-bool", _sdpa(dropout_p=True), TypeError, "dropout_p must be a float"),
    ("sdpa-dropout-None", _sdpa(dropout_p=None), TypeError, "dropout_p must be a float"),
    ("sdpa-dropout-tensor", _sdpa(dropout_p=torch.tensor(0.1)), TypeError, "dropout_p must be a float"),
    ("sdpa-is_causal-None", _sdpa(is_causal=None), TypeError, "is_causal must be a bool, got NoneType"),
    ("sdpa-is_causal-numpy-bool", _sdpa(is_causal=np.bool_(True)), TypeError,
     "is_causal must be a bool, got numpy.bool"),
    ("sdpa-window-3-values", _sdpa(window_size=(1, 2, 3)), TypeError, "window_size must be None or a pair"),
    # ------------------------------------------------------------------------- varlen_attention
    ("varlen-q-None", _va(q=None), TypeError, "q must be a torch.Tensor"),
    ("varlen-head-dim-0", _va(q=P[..., :0], k=P[..., :0]), ValueError, "head dim D must be >= 1"),
    ("varlen-complex", _va(q=P.to(torch.complex64)), TypeError, "q must be a floating-point"),
    ("varlen-k-meta", _va(k=meta(P)), ValueError, "k is on meta but q is on " + DEVICE),
    ("varlen-cu-list", _va(cq=[0, 4, 10]), TypeError, "cu_seqlens_q must be a torch.Tensor, got list"),
    ("varlen-cu-uint8", _va(cq=CU.to(torch.uint8)), TypeError, "cu_seqlens_q must be an int32"),
    ("varlen-cu-int16", _va(ck=CU.to(torch.int16)), TypeError, "cu_seqlens_k must be an int32"),
    ("varlen-cu-2d", _va(cq=CU[None], ck=CU[None]), ValueError, "cu_seqlens_q must be 1-D"),
    ("varlen-cu-0dim", _va(cq=torch.tensor(0, dtype=torch.int32)), ValueError, "cu_seqlens_q must be 1-D"),
    ("varlen-cu-meta", _va(cq=meta(CU)), ValueError, "cu_seqlens_q is on meta"),
    ("varlen-cu-k-not-total-k", _va(k=P[:8], v=P[:8]), ValueError,
     r"cu_seqlens_k\[-1\] = 10 does not match the packed length 8"),
    ("varlen-max-negative", _va(mq=-1), ValueError, "max_seqlen_q must be >= 0"),
    ("varlen-max-bool", _va(mq=True), TypeError, "max_seqlen_q must be an int, got bool"),
    ("varlen-max-None", _va(mk=None), TypeError, "max_seqlen_k must be an int, got NoneType"),
    ("varlen-max-tensor", _va(mq=torch.tensor(6)), TypeError, "max_seqlen_q must be an int, got Tensor"),
    ("varlen-scale-nan", _va(scale=float("nan")), ValueError, "scale must be a finite positive"),
    ("varlen-alibi-wrong-batch", _va(alibi_slopes=ones(3, 2)), ValueError,
     r"alibi_slopes must have shape \(H,\)"),
    # ------------------------------------------------------------------- block_sparse_attention
    ("bsa-layout-None", _bsa(layout=None), TypeError, "layout must be a torch.Tensor, got NoneType"),
    ("bsa-layout-list", _bsa(layout=LAY.tolist()), TypeError, "layout must be a torch.Tensor, got list"),
    ("bsa-layout-complex", _bsa(layout=LAY.to(torch.complex64)), TypeError, "layout must be a bool"),
    ("bsa-layout-meta", _bsa(layout=meta(LAY)), ValueError, "layout is on meta but query is on " + DEVICE),
    ("bsa-block_size-bool", _bsa(block_size=True), TypeError, "block_size must be an int, got bool"),
    ("bsa-block_size-numpy-float", _bsa(block_size=np.float64(16)), TypeError, "block_size must be an int"),
    ("bsa-head-dim-0", _bsa(q=QB[..., :0], k=QB[..., :0]), ValueError, "head dim D must be >= 1"),
    ("bsa-fewer-key-heads", _bsa(k=QB[:, :1], v=QB[:, :1]), ValueError, "same batch and head dims"),
    ("bsa-mask-int", _bsa(attn_mask=ones(20, 20, dtype=torch.int32)), TypeError,
     "attn_mask must be a bool tensor"),
    ("bsa-mask-causal-bias", _bsa(attn_mask=causal_upper_left(20, 20)), TypeError,
     "attn_mask is one of torch's causal-bias objects"),
    ("bsa-mask-0dim", _bsa(attn_mask=torch.tensor(True, device=DEVICE)),
     ValueError, "attn_mask must have at least 1 dim"),
    ("bsa-scale-nan", _bsa(scale=float("nan")), ValueError, "scale must be a finite positive"),
    ("bsa-dropout-nan", _bsa(dropout_p=float("nan")), ValueError, r"dropout_p must be in \[0, 1\]"),
    # ---------------------------------------------------------------------- linformer_attention
    ("linformer-proj_k-None", _la(pk=None), TypeError, "proj_k must be a torch.Tensor, got NoneType"),
    ("linformer-proj_k-int", _la(pk=E.int()), TypeError, "proj_k must be a floating-point"),
    ("linformer-proj_v-complex", _la(pv=E.to(torch.complex64)), TypeError, "proj_v must be a floating-point"),
    ("linformer-proj_k-1d", _la(pk=E[0], pv=E[0]), ValueError, "proj_k must be 2 or 3-D"),
    ("linformer-proj_k-4d", _la(pk=E[None, None]), ValueError, "proj_k must be 2 or 3-D"),
    ("linformer-proj-k0", _la(pk=E[:0], pv=E[:0]), ValueError, "proj_k must project to k >= 1"),
    ("linformer-proj_k-meta", _la(pk=meta(E)), ValueError, "proj_k is on meta"),
    ("linformer-kpm-meta", _la(key_padding_mask=meta(zeros(2, 7, dtype=torch.bool))), ValueError,
     "key_padding_mask is on meta"),
    ("linformer-kpm-list", _la(key_padding_mask=[[False] * 7] * 2), TypeError,
     "key_padding_mask must be a torch.Tensor"),
    ("linformer-fewer-key-heads", _la(k=K[:, :1], v=V[:, :1]), ValueError, "same batch and head dims"),
    ("linformer-head-dim-0", _la(q=Q[..., :0], k=K[..., :0]), ValueError, "head dim D must be >= 1"),
    ("linformer-scale-inf", _la(scale=float("inf")), ValueError, "scale must be a finite positive"),
    # ------------------------------------------------------------------------------- layer_norm
    ("layer_norm-input-None", _ln(x=None), TypeError, "input must be a torch.Tensor, got NoneType"),
    ("layer_norm-input-list", _ln(x=X.tolist()), TypeError, "input must be a torch.Tensor, got list"),
    ("layer_norm-input-complex", _ln(x=X.to(torch.complex64)), TypeError, "input must be a floating-point"),
    ("layer_norm-input-0dim", _ln(x=torch.tensor(1.0), shape=1), ValueError, "normalized_shape"),
    ("layer_norm-shape-empty", _ln(shape=()), ValueError, "normalized_shape"),
    ("layer_norm-shape-float-entry", _ln(shape=(16.5,)), TypeError, "normalized_shape must hold ints"),
    ("layer_norm-shape-bool-entry", _ln(shape=(True,)), TypeError, "normalized_shape must hold ints"),
    ("layer_norm-shape-str", _ln(shape="16"), TypeError, "normalized_shape must be an int or a sequence"),
    ("layer_norm-shape-bool", _ln(shape=True), TypeError, "normalized_shape must be an int or a sequence"),
    ("layer_norm-shape-float", _ln(shape=16.0), TypeError, "normalized_shape must be an int or a sequence"),
    ("layer_norm-shape-negative", _ln(shape=-16), ValueError, "normalized_shape"),
    ("layer_norm-eps-nan", _ln(eps=float("nan")), ValueError, "eps must be >= 0 and finite"),
    ("layer_norm-eps-inf", _ln(eps=float("inf")), ValueError, "eps must be >= 0 and finite"),
    ("layer_norm-eps-None", _ln(eps=None), TypeError, "eps must be a float, got NoneType"),
    ("layer_norm-eps-tensor", _ln(eps=torch.tensor(1e-5)), TypeError, "eps must be a float, got Tensor"),
    ("layer_norm-weight-int", _ln(X, 16, ones(16, dtype=torch.int32)), TypeError,
     "weight must be a floating-point"),
    ("layer_norm-weight-meta", _ln(X, 16, meta(ones(16))), ValueError, "weight is on meta"),
    ("layer_norm-bias-list", _ln(X, 16, None, [0.0] * 16), TypeError, "bias must be a torch.Tensor"),
    ("layer_norm-input-meta", lambda be: ln(meta(X), 16, ones(16), backend=be), ValueError,
     "weight is on " + DEVICE + ".* but input is on meta"),
    # --------------------------------------------------------------------------- add_layer_norm
    ("add_layer_norm-residual-None", _aln(r=None), TypeError, "residual must be a torch.Tensor"),
    ("add_layer_norm-0dim", _aln(x=torch.tensor(1.0), r=torch.tensor(1.0)), ValueError,
     "input must have at least 1 dim"),
    ("add_layer_norm-weight-2d", _aln(w=ones(1, 16)), ValueError, r"weight must have shape \(16,\)"),
    ("add_layer_norm-weight-int", _aln(w=ones(16, dtype=torch.int64)), TypeError,
     "weight must be a floating-point"),
    ("add_layer_norm-residual-meta", _aln(r=meta(X)), ValueError, "residual is on meta"),
    ("add_layer_norm-input_bias-meta", _aln(input_bias=meta(ones(16))), ValueError,
     "input_bias is on meta"),
    ("add_layer_norm-return_residual-int", _aln(return_residual=1), TypeError,
     "return_residual must be a bool, got int"),
    ("add_layer_norm-eps-inf", _aln(eps=float("inf")), ValueError, "eps must be >= 0 and finite"),
    ("add_layer_norm-dropout-nan", _aln(dropout_p=float("nan")),
     ValueError, r"dropout_p must be in \[0, 1\]"),
    ("add_layer_norm-complex", _aln(x=X.to(torch.complex64), r=X.to(torch.complex64)), TypeError,
     "input must be a floating-point"),
    # ------------------------------------------------------------------------- gelu, bias_gelu
    ("gelu-input-None", _gelu(None), TypeError, "input must be a torch.Tensor, got NoneType"),
    ("gelu-input-int", _gelu(X.int()), TypeError, "input must be a floating-point"),
    ("gelu-input-complex", _gelu(X.to(torch.complex64)), TypeError, "input must be a floating-point"),
    ("gelu-approximate-None", _gelu(X, None), TypeError, "approximate must be a str"),
    ("bias_gelu-input-0dim", _bias_gelu(torch.tensor(1.0)), ValueError, "input must have at least 1 dim"),
    ("bias_gelu-bias-meta", _bias_gelu(bias=meta(ones(16))), ValueError, "bias is on meta"),
    ("bias_gelu-bias-int", _bias_gelu(bias=ones(16, dtype=torch.int32)), TypeError,
     "bias must be a floating-point"),
    ("bias_gelu-bias-2d", _bias_gelu(bias=ones(1, 16)), ValueError, "bias must be 1-D"),
    ("bias_gelu-bias-list", _bias_gelu(bias=[1.0] * 16), TypeError, "bias must be a torch.Tensor"),
    # -------------------------------------------------------------------------------------- geglu
    ("geglu-input-None", _geglu(None), TypeError, "input must be a torch.Tensor, got NoneType"),
    ("geglu-input-int", _geglu(X.int()), TypeError, "input must be a floating-point"),
    ("geglu-packed-odd", _geglu(X[..., :15]), ValueError, "input must have an even last dim"),
    ("geglu-packed-0dim", _geglu(torch.tensor(1.0)), ValueError, "input must have an even last dim"),
    ("geglu-gate-list", _geglu(X, [1.0] * 16), TypeError, "gate must be a torch.Tensor"),
    ("geglu-gate-shape", _geglu(X, X[..., :8]), ValueError, "gate must have input's shape"),
    ("geglu-gate-broadcast", _geglu(X, X[:1]), ValueError, "gate must have input's shape"),
    ("geglu-gate-dtype", _geglu(X, X.half()), TypeError, "gate has dtype torch.float16"),
    ("geglu-gate-meta", _geglu(X, meta(X)), ValueError, "gate is on meta"),
    ("geglu-approximate-erf", _geglu(X, None, "erf"), ValueError, "approximate must be 'none'"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call,exc,match", [c[1:] for c in OP_CASES], ids=[c[0] for c in OP_CASES])
def test_op_bad_input(call, exc, match, backend):
    with pytest.raises(exc, match=match):
        call(backend)


# Refused by the Triton backend only (the torch backend serves them): BackendError with the reason.
TRITON_REFUSALS = [
    ("sdpa-float64", _sdpa(query=Q.double(), key=K.double(), value=V.double()), "float64"),
    ("sdpa-meta", _sdpa(query=meta(Q), key=meta(K), value=meta(V)), "tensors on meta"),
    ("sdpa-value-head-dim-0", _sdpa(value=V[..., :0]), "value head dim Dv = 0"),
    ("varlen-max_seqlen-huge", _va(mq=2 ** 40), "32-bit offsets"),
    ("sdpa-scale-huge", _sdpa(scale=3e38), "scale 3e\\+38 > 2.359e\\+38"),
    ("varlen-scale-huge", _va(scale=2.4e38), "scale \\* log2\\(e\\)"),
    ("bsa-scale-huge", _bsa(scale=2.4e38), "scale \\* log2\\(e\\)"),
    ("bsa-block_size-3", _bsa(layout=ones(1, 7, 7, dtype=torch.bool), block_size=3), "block_size 3"),
    ("layer_norm-weight-float64", _ln(X, 16, ones(16, dtype=torch.float64)), "weight is float64"),
    ("gelu-meta", _gelu(meta(X)), "tensors on meta"),
]


@pytest.mark.parametrize("call,match", [c[1:] for c in TRITON_REFUSALS], ids=[c[0] for c in TRITON_REFUSALS])
def test_triton_refusal_is_a_backend_error(call, match):
    with pytest.raises(fastbert.backends.BackendError, match=match):
        call("triton")
    call("torch")  # the reference serves it


# ---------------------------------------------------------------------------- unpad / pad_input
XP = t(2, 4, 8)
AM = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
PACKED, IDX, _, _ = fastbert.unpad_input(XP, AM)

PADDING_CASES = [
    ("unpad-hidden-None", lambda: fastbert.unpad_input(None, AM), TypeError,
     "hidden_states must be a torch.Tensor"),
    ("unpad-mask-None", lambda: fastbert.unpad_input(XP, None),
     TypeError, "attention_mask must be a torch.Tensor"),
    ("unpad-mask-complex", lambda: fastbert.unpad_input(XP, AM.to(torch.complex64)), TypeError,
     "attention_mask must be bool or integer"),
    ("unpad-mask-meta", lambda: fastbert.unpad_input(XP, meta(AM)), ValueError, "attention_mask is on meta"),
    ("unpad-all-meta", lambda: fastbert.unpad_input(meta(XP), meta(AM)), ValueError,
     "attention_mask is a meta tensor"),
    ("pad-packed-None", lambda: fastbert.pad_input(None, IDX, 2, 4),
     TypeError, "packed must be a torch.Tensor"),
    ("pad-indices-list", lambda: fastbert.pad_input(PACKED, IDX.tolist(), 2, 4), TypeError,
     "indices must be a torch.Tensor"),
    ("pad-packed-0dim", lambda: fastbert.pad_input(torch.tensor(1.0), IDX, 2, 4), ValueError,
     "packed must be .* at least 1 dim"),
    ("pad-indices-float", lambda: fastbert.pad_input(PACKED, IDX.float(), 2, 4), TypeError,
     "indices must be an int32 or int64"),
    ("pad-indices-meta", lambda: fastbert.pad_input(PACKED, meta(IDX), 2, 4),
     ValueError, "indices is on meta"),
    ("pad-batch-negative", lambda: fastbert.pad_input(PACKED, IDX, -2, 4), ValueError, "batch must be >= 0"),
    ("pad-batch-float", lambda: fastbert.pad_input(PACKED, IDX, 2.0, 4), TypeError, "batch must be an int"),
    ("pad-batch-None", lambda: fastbert.pad_input(PACKED, IDX, None, 4), TypeError, "batch must be an int"),
    ("pad-batch-bool", lambda: fastbert.pad_input(PACKED, IDX, True, 8), TypeError,
     "batch must be an int, got bool"),
    ("pad-seqlen-tensor", lambda: fastbert.pad_input(PACKED, IDX, 2, torch.tensor(4)), TypeError,
     "seqlen must be an int, got Tensor"),
    ("pad-seqlen-too-small", lambda: fastbert.pad_input(PACKED, IDX, 2, 2), ValueError,
     "5 packed tokens do not fit in batch \\* seqlen"),
    ("pad-indices-out-of-range", lambda: fastbert.pad_input(PACKED, IDX + 100, 2, 4), ValueError,
     r"indices must be positions in \[0, batch \* seqlen\)"),
    ("pad-indices-negative", lambda: fastbert.pad_input(PACKED, IDX - 100, 2, 4), ValueError,
     r"indices must be positions in \[0, batch \* seqlen\)"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in PADDING_CASES], ids=[c[0] for c in PADDING_CASES])
def test_padding_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ----------------------------------------------------------------------------------- sparsity
SPARSITY_CASES = [
    ("dense-device-bad-str", lambda: S.dense(64, 16, device="nope"), ValueError, "device 'nope'"),
    ("dense-device-float", lambda: S.dense(64, 16, device=3.5), TypeError, "device must be None"),
    ("sliding_window-device-list", lambda: S.sliding_window(64, 16, device=["cpu"]), TypeError,
     "device must be None"),
    ("bigbird-device-bad-str", lambda: S.bigbird(64, 16, device="nope"), ValueError, "device 'nope'"),
    ("bigbird-seed-huge", lambda: S.bigbird(64, 16, seed=2 ** 70), ValueError, "seed must be <="),
    ("bigbird-seed-float", lambda: S.bigbird(64, 16, seed=1.0), TypeError, "seed must be an int"),
    ("global_tokens-global-tensor-2d", lambda: S.global_tokens(64, 16, global_blocks=torch.tensor([[0]])),
     TypeError, "global_blocks as a tensor must be a 1-D integer tensor"),
    ("global_tokens-global-tensor-float", lambda: S.global_tokens(64, 16, global_blocks=torch.tensor([0.5])),
     TypeError, "global_blocks as a tensor must be a 1-D integer tensor"),
    ("global_tokens-global-set", lambda: S.global_tokens(64, 16, global_blocks={0, 1}), TypeError,
     "global_blocks must be an int .* got set"),
    ("global_tokens-global-negative", lambda: S.global_tokens(64, 16, global_blocks=[-1]), ValueError,
     "global block index -1"),
    ("from_token_mask-0-heads", lambda: S.from_token_mask(torch.ones(0, 4, 4, dtype=torch.bool), 2),
     ValueError,
     "mask must have H, Lq, Lk >= 1"),
    ("from_token_mask-4d", lambda: S.from_token_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), 2), ValueError,
     r"mask must be \(Lq, Lk\) or \(H, Lq, Lk\)"),
    ("from_token_mask-block_size-bool", lambda: S.from_token_mask(torch.ones(4, 4, dtype=torch.bool), True),
     TypeError, "block_size must be an int"),
    ("density-meta", lambda: S.density(meta(LAY)), ValueError, "layout is a meta tensor"),
    ("render-meta", lambda: S.render(meta(LAY)), ValueError, "layout is a meta tensor"),
    ("render-head-negative", lambda: S.render(LAY, -1), ValueError, "head must be >= 0"),
    ("union-meta", lambda: S.union(LAY, meta(LAY)), ValueError, r"layouts\[1\] is on meta"),
    ("union-None", lambda: S.union(None), TypeError, r"layouts\[0\] must be a torch.Tensor"),
    ("prepare_layout-None", lambda: S.prepare_layout(None), TypeError, "layout must be a torch.Tensor"),
    ("num_blocks-negative", lambda: S.num_blocks(-1, 16), ValueError, "seq_len must be >= 0"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in SPARSITY_CASES],
                         ids=[c[0] for c in SPARSITY_CASES])
def test_sparsity_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# -------------------------------------------------------------------------- module constructors
MODULE_CASES = [
    ("mha-embed_dim-0", lambda: fnn.MultiheadAttention(0, 2), ValueError, "embed_dim must be a positive int"),
    ("mha-num_heads-negative", lambda: fnn.MultiheadAttention(16, -2), ValueError,
     "num_heads must be a positive int"),
    ("mha-embed_dim-float", lambda: fnn.MultiheadAttention(16.0, 2),
     TypeError, "embed_dim must be a positive int"),
    ("mha-num_heads-bool", lambda: fnn.MultiheadAttention(16, True),
     TypeError, "num_heads must be a positive int"),
    ("mha-not-divisible", lambda: fnn.MultiheadAttention(16, 3), ValueError, "divisible by num_heads"),
    ("mha-dropout-2", lambda: fnn.MultiheadAttention(16, 2, dropout=2.0),
     ValueError, r"dropout must be in \[0, 1\]"),
    ("mha-dropout-nan", lambda: fnn.MultiheadAttention(16, 2, dropout=float("nan")), ValueError,
     r"dropout must be in \[0, 1\]"),
    ("mha-dropout-str", lambda: fnn.MultiheadAttention(16, 2, dropout="0.1"),
     TypeError, "dropout must be a float"),
    ("mha-kdim-0", lambda: fnn.MultiheadAttention(16, 2, kdim=0, vdim=4),
     ValueError, "kdim must be a positive int"),
    ("mha-dtype-int", lambda: fnn.MultiheadAttention(16, 2, dtype=torch.int32), TypeError,
     "dtype must be a floating dtype"),
    ("layer_norm-shape-negative", lambda: fnn.LayerNorm(-3),
     ValueError, "normalized_shape must hold sizes >= 0"),
    ("layer_norm-shape-float", lambda: fnn.LayerNorm(16.0), TypeError, "normalized_shape must be an int"),
    ("layer_norm-eps-negative", lambda: fnn.LayerNorm(16, eps=-1.0), ValueError, "eps must be >= 0"),
    ("layer_norm-eps-nan", lambda: fnn.LayerNorm(16, eps=float("nan")), ValueError, "eps must be >= 0"),
    ("layer_norm-eps-str", lambda: fnn.LayerNorm(16, eps="1e-5"), TypeError, "eps must be a float"),
    ("layer_norm-dtype-int", lambda: fnn.LayerNorm(16, dtype=torch.int64),
     TypeError, "dtype must be a floating"),
    ("gelu-approximate-erf", lambda: fnn.GELU("erf"), ValueError, "approximate must be 'none'"),
    ("gelu-approximate-None", lambda: fnn.GELU(None), TypeError, "approximate must be a str"),
    ("encoder_layer-not-divisible", lambda: fnn.TransformerEncoderLayer(16, 3), ValueError, "divisible"),
    ("encoder_layer-ff-0", lambda: fnn.TransformerEncoderLayer(16, 2, dim_feedforward=0), ValueError,
     "dim_feedforward must be a positive int"),
    ("encoder_layer-ff-negative", lambda: fnn.TransformerEncoderLayer(16, 2, dim_feedforward=-1), ValueError,
     "dim_feedforward must be a positive int"),
    ("encoder_layer-dropout-2", lambda: fnn.TransformerEncoderLayer(16, 2, dropout=2.0), ValueError,
     r"dropout must be in \[0, 1\]"),
    ("encoder_layer-eps-negative", lambda: fnn.TransformerEncoderLayer(16, 2, layer_norm_eps=-1.0),
     ValueError,
     "eps must be >= 0"),
    ("encoder_layer-activation-int", lambda: fnn.TransformerEncoderLayer(16, 2, activation=3), TypeError,
     "activation must be 'relu', 'gelu' or a callable"),
    ("block_sparse-embed_dim-float", lambda: fnn.BlockSparseSelfAttention(16.0, 2), TypeError,
     "embed_dim must be a positive int"),
    ("block_sparse-dropout-str", lambda: fnn.BlockSparseSelfAttention(16, 2, dropout="x"), TypeError,
     "dropout must be a float"),
    ("block_sparse-dropout-None", lambda: fnn.BlockSparseSelfAttention(16, 2, dropout=None), TypeError,
     "dropout must be a float"),
    ("block_sparse-dropout-nan", lambda: fnn.BlockSparseSelfAttention(16, 2, dropout=float("nan")),
     ValueError,
     r"dropout must be in \[0, 1\]"),
    ("block_sparse-batch_first-str", lambda: fnn.BlockSparseSelfAttention(16, 2, batch_first="yes"),
     TypeError,
     "batch_first must be a bool"),
    ("block_sparse-dtype-int", lambda: fnn.BlockSparseSelfAttention(16, 2, dtype=torch.int32), TypeError,
     "dtype must be a floating dtype"),
    ("block_sparse-block_size-float", lambda: fnn.BlockSparseSelfAttention(16, 2, block_size=16.0), TypeError,
     "block_size must be a positive int"),
    ("block_sparse-layout-int-tensor",
     lambda: fnn.BlockSparseSelfAttention(16, 2, layout=torch.ones(1, 2, 2, dtype=torch.int64)), TypeError,
     "layout must be a bool tensor"),
    ("block_sparse-layout-None", lambda: fnn.BlockSparseSelfAttention(16, 2, layout=None), TypeError,
     "layout must be a bool tensor or a preset name"),
    ("block_sparse-layout_kwargs-list", lambda: fnn.BlockSparseSelfAttention(16, 2, layout_kwargs=[1]),
     TypeError,
     "layout_kwargs must be a dict"),
    ("block_sparse-layout_kwargs-device",
     lambda: fnn.BlockSparseSelfAttention(16, 2, layout_kwargs={"device": "cpu"}), ValueError,
     r"layout_kwargs may not set \['device'\]"),
    ("block_sparse-layout_kwargs-seq_len",
     lambda: fnn.BlockSparseSelfAttention(16, 2, layout_kwargs={"seq_len": 3}), ValueError,
     r"layout_kwargs may not set \['seq_len'\]"),
    ("block_sparse-layout_kwargs-key_len",
     lambda: fnn.BlockSparseSelfAttention(16, 2, layout_kwargs={"key_len": 3}), ValueError,
     r"layout_kwargs may not set \['key_len'\]"),
    ("block_sparse-layout_kwargs-window-negative",
     lambda: fnn.BlockSparseSelfAttention(16, 2, layout_kwargs={"window": -1}),
     ValueError, "window must be >= 0"),
    ("block_sparse-bigbird-heads-mismatch",
     lambda: fnn.BlockSparseSelfAttention(16, 2, layout="bigbird", layout_kwargs={"num_heads": 3}),
     ValueError,
     "gives layouts for 3 heads; the module has num_heads = 2"),
    ("linformer-k-float", lambda: fnn.LinformerSelfAttention(16, 2, 8, k=2.0),
     TypeError, "k must be a positive int"),
    ("linformer-max_seq_len-0", lambda: fnn.LinformerSelfAttention(16, 2, 0), ValueError,
     "max_seq_len must be a positive int"),
    ("linformer-share_heads-str", lambda: fnn.LinformerSelfAttention(16, 2, 8, k=2, share_heads="no"),
     TypeError,
     "share_heads must be a bool"),
    ("linformer-share_kv-None", lambda: fnn.LinformerSelfAttention(16, 2, 8, k=2, share_kv=None), TypeError,
     "share_kv must be a bool"),
    ("linformer-dtype-int", lambda: fnn.LinformerSelfAttention(16, 2, 8, k=2, dtype=torch.int64), TypeError,
     "dtype must be a floating dtype"),
    ("optimize-class-not-instance", lambda: fastbert.optimize(torch.nn.LayerNorm), TypeError,
     "model must be a torch.nn.Module, got type"),
    ("optimize-backend-int", lambda: fastbert.optimize(torch.nn.Linear(2, 2), backend=1), TypeError,
     "backend must be a str or None"),
    ("restore-None", lambda: fastbert.restore(None), TypeError, "model must be a torch.nn.Module"),
    ("from_torch-None", lambda: fnn.MultiheadAttention.from_torch(None), TypeError,
     "module must be a torch.nn.MultiheadAttention"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in MODULE_CASES], ids=[c[0] for c in MODULE_CASES])
def test_module_constructor_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------------------ module forwards
X3 = t(2, 5, 16)
KPM_META = torch.zeros(2, 5, dtype=torch.bool, device="meta")


def _mha(backend):
    return fnn.MultiheadAttention(16, 2, batch_first=True, device=DEVICE, backend=backend)


def _layer(backend):
    return fnn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True,
                                       device=DEVICE, backend=backend)


def _block_sparse(backend):
    return fnn.BlockSparseSelfAttention(16, 2, block_size=16, device=DEVICE, backend=backend)


def _linformer(backend):
    return fnn.LinformerSelfAttention(16, 2, 8, k=4, device=DEVICE, backend=backend)


FORWARD_CASES = [
    ("mha-query-int", _mha, lambda m: m(X3.int(), X3.int(), X3.int()), TypeError,
     "query has dtype torch.int32 but the module's parameters are torch.float32"),
    ("mha-query-float64", _mha, lambda m: m(X3.double(), X3.double(), X3.double(), need_weights=False),
     TypeError, "query has dtype torch.float64"),
    ("mha-key-float16", _mha, lambda m: m(X3, X3.half(), X3, need_weights=False), TypeError,
     "key has dtype torch.float16"),
    ("mha-query-meta", _mha, lambda m: m(meta(X3), X3, X3, need_weights=False), ValueError,
     "query is on meta but the module's parameters are on " + DEVICE),
    ("mha-kpm-meta", _mha, lambda m: m(X3, X3, X3, key_padding_mask=KPM_META), ValueError,
     "key_padding_mask is on meta but query is on " + DEVICE),
    ("mha-attn_mask-meta", _mha,
     lambda m: m(X3, X3, X3, attn_mask=meta(zeros(5, 5, dtype=torch.bool)), need_weights=False),
     ValueError, "attn_mask is on meta but query is on " + DEVICE),
    ("mha-attn_mask-list", _mha, lambda m: m(X3, X3, X3, attn_mask=[[True]]), TypeError,
     "attn_mask must be a torch.Tensor or None, got list"),
    ("encoder_layer-src-last-dim", _layer, lambda m: m(X3[..., :8]),
     ValueError, "src must end in d_model = 16"),
    ("encoder_layer-src-float16", _layer, lambda m: m(X3.half()), TypeError, "src has dtype torch.float16"),
    ("encoder_layer-src-int", _layer, lambda m: m(X3.int()), TypeError, "src has dtype torch.int32"),
    ("encoder_layer-kpm-meta", _layer, lambda m: m(X3, src_key_padding_mask=KPM_META), ValueError,
     "src_key_padding_mask is on meta but src is on " + DEVICE),
    ("encoder_layer-src_mask-meta", _layer,
     lambda m: m(X3, src_mask=meta(zeros(5, 5, dtype=torch.bool))), ValueError,
     "src_mask is on meta but src is on " + DEVICE),
    ("block_sparse-x-float16", _block_sparse, lambda m: m(X3.half()), TypeError, "x has dtype torch.float16"),
    ("block_sparse-x-None", _block_sparse, lambda m: m(None), TypeError, "x must be a torch.Tensor"),
    ("block_sparse-kpm-meta", _block_sparse, lambda m: m(X3, key_padding_mask=KPM_META), ValueError,
     "key_padding_mask is on meta but x is on " + DEVICE),
    ("block_sparse-kpm-int", _block_sparse, lambda m: m(X3, key_padding_mask=zeros(2, 5, dtype=torch.int64)),
     TypeError, "key_padding_mask must be a bool tensor .* got dtype torch.int64"),
    ("linformer-x-int", _linformer, lambda m: m(X3.int()), TypeError, "x has dtype torch.int32"),
    ("linformer-kpm-meta", _linformer, lambda m: m(X3, key_padding_mask=KPM_META), ValueError,
     "key_padding_mask is on meta but x is on " + DEVICE),
    ("layer_norm-input-meta", lambda be: fnn.LayerNorm(16, device=DEVICE, backend=be), lambda m: m(meta(X3)),
     ValueError,
     "weight is on " + DEVICE + ".* but input is on meta"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make,call,exc,match", [c[1:] for c in FORWARD_CASES],
                         ids=[c[0] for c in FORWARD_CASES])
def test_module_forward_bad_input(make, call, exc, match, backend):
    module = make(backend)
    with pytest.raises(exc, match=match):
        call(module)


def test_module_dtype_check_leaves_autocast_alone():
    """Under autocast an input of another dtype than the parameters is legitimate (the matmuls cast)."""
    m = fnn.BlockSparseSelfAttention(16, 2, block_size=16, backend="torch")
    x = X3.cpu()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x.bfloat16())
    assert out.shape == x.shape


# --------------------------------------------------- degenerate but valid inputs: the right answer
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lq,lk", [(0, 0), (0, 20), (20, 0)], ids=["Lq0-Lk0", "Lq0-Lk20", "Lq20-Lk0"])
def test_block_sparse_empty_sequences_return_zeros(lq, lk, backend):
    # (the torch backend crashed with an IndexError from amax on an empty reduction)
    q, k = t(1, 2, lq, 16), t(1, 2, lk, 16)
    layout = ones(1, -(-lq // 16), -(-lk // 16), dtype=torch.bool)
    out = bsa(q, k, k, layout, 16, backend=backend)
    assert out.shape == (1, 2, lq, 16) and (out == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_sparse_module_empty_sequence(backend):
    # (the preset raised "seq_len must be >= 1", a layout tensor crashed in the torch backend)
    for m in (_block_sparse(backend),
              fnn.BlockSparseSelfAttention(16, 2, layout=LAY, block_size=16, device=DEVICE,
                                           backend=backend)):
        out = m(X3[:, :0])
        assert out.shape == (2, 0, 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_attention_gives_a_float_mask_its_zero_gradient(backend):
    # (with H = 0 or Lk = 0 the shortcut to zeros left a trainable mask out of the graph: grad None)
    for lq, lk, h in ((5, 0, 2), (5, 7, 0)):
        q, k = t(2, h, lq, 16), t(2, h, lk, 16)
        mask = t(2, h, lq, lk).requires_grad_()
        out = sdpa(q, k, k, attn_mask=mask, backend=backend)
        g, = torch.autograd.grad(out.sum(), mask)
        assert (out == 0).all() and g.shape == mask.shape and (g == 0).all()
        mask = t(1, 1, lq, lk).requires_grad_()
        layout = ones(1, 1, -(-lk // 16), dtype=torch.bool)
        g, = torch.autograd.grad(bsa(q, k, k, layout, 16, attn_mask=mask, backend=backend).sum(), mask)
        assert g.shape == mask.shape and (g == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("empty", ["keys", "queries"])
def test_varlen_empty_attention_gives_a_float_mask_its_zero_gradient(backend, empty):
    # (the torch backend and the reference left a trainable mask out of the graph when no
    # sequence had a key or a query: grad None, where the Triton backend gives zeros)
    full = torch.tensor([0, 3, 7], dtype=torch.int32, device=DEVICE)
    none = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    cq, ck = (full, none) if empty == "keys" else (none, full)
    q, k = t(int(cq[-1]), 2, 16).requires_grad_(), t(int(ck[-1]), 2, 16).requires_grad_()
    mask = t(2, 2, 4, 5).requires_grad_()
    out = va(q, k, k, cq, ck, 4, 5, attn_mask=mask, backend=backend)
    assert out.shape == (q.shape[0], 2, 16) and (out == 0).all()
    grads = torch.autograd.grad(out.sum(), (mask, q, k))
    for g, x in zip(grads, (mask, q, k)):
        assert g.shape == x.shape and (g == 0).all()


def test_mha_need_weights_with_no_keys():
    # (need_weights=True with S = 0 crashed with an IndexError from amax)
    m = fnn.MultiheadAttention(16, 2, batch_first=True, device=DEVICE, backend="torch")
    out, w = m(X3, X3[:, :0], X3[:, :0])
    out2, _ = m(X3, X3[:, :0], X3[:, :0], need_weights=False)
    assert w.shape == (2, 5, 0) and torch.equal(out, out2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_integers_are_ints(backend):
    ref = sdpa(Q, K, V, window_size=(1, 2), backend=backend)
    assert torch.equal(sdpa(Q, K, V, window_size=(np.int64(1), np.int32(2)), backend=backend), ref)
    assert torch.equal(S.global_tokens(64, 16, global_blocks=torch.tensor(2)),
                       S.global_tokens(64, 16, global_blocks=2))
    assert torch.equal(ln(X, (np.int64(16),), backend=backend), ln(X, 16, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_are_tensors(backend):
    """nn.Parameter (a tensor subclass) is accepted wherever a tensor is, with the same result."""
    par = torch.nn.Parameter
    assert torch.equal(va(par(P), P, P, par(CU, requires_grad=False), CU, 6, 6, backend=backend),
                       va(P, P, P, CU, CU, 6, 6, backend=backend))
    assert torch.equal(bsa(QB, QB, QB, par(LAY, requires_grad=False), 16, backend=backend),
                       bsa(QB, QB, QB, LAY, 16, backend=backend))
    mask = par(zeros(5, 7))
    out = sdpa(Q, K, V, attn_mask=mask, backend=backend)
    assert torch.equal(out, sdpa(Q, K, V, attn_mask=mask.detach(), backend=backend))
    out.sum().backward()
    assert mask.grad.shape == mask.shape


def test_pad_input_accepts_exact_fit():
    back = fastbert.pad_input(PACKED, IDX.int(), 2, 4)
    assert torch.equal(back[AM.bool()], XP[AM.bool()]) and (back[~AM.bool()] == 0).all()


# ------------------------------------ a stride-0 (expanded) float mask gets its gradient per element
def test_triton_sdpa_gradient_of_stride0_float_mask():
    base = t(1, 1, 5, 7).requires_grad_()
    mask = base.expand(2, 2, 5, 7)
    out = sdpa(Q, K, V, attn_mask=mask, backend="triton")
    got, = torch.autograd.grad(out.sum(), base)
    want, = torch.autograd.grad(sdpa(Q, K, V, attn_mask=mask, backend="torch").sum(), base)
    torch.testing.assert_close(got, want)


def test_triton_block_sparse_gradient_of_stride0_float_mask():
    base = t(1, 1, 20, 20).requires_grad_()
    mask = base.expand(1, 2, 20, 20)
    out = bsa(QB, QB, QB, LAY, 16, attn_mask=mask, backend="triton")
    got, = torch.autograd.grad(out.sum(), base)
    want, = torch.autograd.grad(bsa(QB, QB, QB, LAY, 16, attn_mask=mask, backend="torch").sum(), base)
    torch.testing.assert_close(got, want)
