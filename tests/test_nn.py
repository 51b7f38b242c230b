"""fastbert.nn modules against their torch counterparts with identical weights.

Each comparison runs the fastbert module in the test dtype, the torch module in the same dtype
(PyTorch's own low-precision result) and the torch module in float64 (the reference), with the same
inputs and the same upstream gradient, and applies fastbert.testing's rule to the output and every
gradient (inputs and parameters). The modules run on the torch reference backend on CPU; the
Triton tests run the same modules with backend="triton" (under the interpreter without a GPU) when
the ops they call have a Triton registration.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbert
import fastbert.nn as fnn
from fastbert import backends, reference
from fastbert.testing import DEVICE, assert_close

# torch warns when key_padding_mask and attn_mask differ in type; those cases are tested on purpose
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _leaf(t, dtype):
    if t is None:
        return None
    if t.is_floating_point():
        return t.detach().to(dtype).requires_grad_(True)
    return t


def _cast_mask(m, dtype):
    if m is None or m.dtype == torch.bool:
        return m
    return m.to(dtype)


def _run(module, inputs, kwargs, dtype, grads_out, pick):
    """forward + backward with the given upstream gradients; returns (outputs, input grads,
    param grads by name)."""
    module.zero_grad(set_to_none=True)
    xs = [_leaf(x, dtype) for x in inputs]
    kw = {k: _cast_mask(v, dtype) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    out = module(*xs, **kw)
    outs = [o for o in pick(out)]
    loss = sum((o.double() * g.double()).sum() for o, g in zip(outs, grads_out) if o is not None)
    loss.backward()
    return (outs, [None if x is None or not x.is_floating_point() else x.grad for x in xs],
            {n: p.grad for n, p in module.named_parameters()})


def compare_modules(ours, theirs, inputs, kwargs=None, dtype=torch.float32, pick=None,
                    check_param_grads=True, device="cpu", factor=2.0):
    """Compare ``ours`` (fastbert) with ``theirs`` (torch) sharing weights: outputs and gradients.
    Everything runs on ``device``; ``theirs`` in float64 is the reference, in ``dtype`` PyTorch's
    own low-precision result."""
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in (kwargs or {}).items()}
    inputs = [x.to(device) for x in inputs]
    pick = pick or (lambda out: [out])
    ours = ours.to(device=device, dtype=dtype)
    low = copy.deepcopy(theirs).to(device=device, dtype=dtype)
    ref = copy.deepcopy(theirs).to(device=device, dtype=torch.float64)
    with torch.no_grad():
        shapes = [o.shape for o in pick(ref(*[_leaf(x, torch.float64) for x in inputs],
                                            **{k: _cast_mask(v, torch.float64)
                                               if isinstance(v, torch.Tensor) else v
                                               for k, v in kwargs.items()}))
                  if o is not None]
    grads_out = [torch.randn(s, dtype=torch.float64, device=device) for s in shapes]
    o_out, o_gin, o_gp = _run(ours, inputs, kwargs, dtype, grads_out, pick)
    r_out, r_gin, r_gp = _run(ref, inputs, kwargs, torch.float64, grads_out, pick)
    l_out, l_gin, l_gp = _run(low, inputs, kwargs, dtype, grads_out, pick)
    for i, (o, r, lo) in enumerate(zip(o_out, r_out, l_out)):
        if r is None:
            assert o is None, f"output[{i}]: expected None"
            continue
        assert o.dtype == dtype
        assert_close(o, r, lo, factor=factor, name=f"output[{i}]")
    for i, (o, r, lo) in enumerate(zip(o_gin, r_gin, l_gin)):
        if r is None:
            continue
        assert o is not None, f"input {i}: no gradient"
        assert_close(o, r, lo, factor=factor, name=f"grad input[{i}]")
    if check_param_grads:
        assert set(o_gp) == set(r_gp)
        for n in r_gp:
            if r_gp[n] is None:
                assert o_gp[n] is None or not o_gp[n].any(), n
                continue
            assert o_gp[n] is not None, f"{n}: no gradient"
            assert_close(o_gp[n], r_gp[n], l_gp[n], factor=factor, name=f"grad {n}")
    return o_out


def need_triton(*ops):
    missing = [op for op in ops if "triton" not in backends.implementations(op)]
    if missing:
        pytest.skip(f"no Triton registration yet for {missing}")
    reasons = backends.backend_reasons("triton", torch.device(DEVICE))
    if reasons:
        pytest.skip("Triton backend unavailable here: " + "; ".join(reasons))


def run_triton(fn):
    """Run ``fn``; a Triton backend that declines the call (reasons) skips with its reasons."""
    try:
        return fn()
    except backends.BackendError as e:
        pytest.skip(f"the Triton backend declines this call: {e}")


# ----------------------------------------------------------------------------------------------
# MultiheadAttention
# ----------------------------------------------------------------------------------------------
MHA_CONFIGS = {
    "plain": {},
    "kvdim": {"kdim": 12, "vdim": 20},
    "biaskv": {"add_bias_kv": True},
    "zeroattn": {"add_zero_attn": True},
    "biaskv-zeroattn": {"add_bias_kv": True, "add_zero_attn": True},
    "nobias": {"bias": False},
}
E, H, N, L = 16, 4, 3, 7


def _masks(kind, n, lq, s, heads):
    """torch.nn conventions: bool True = do not attend; float added. No row fully masked."""
    kpm = attn = None
    if "kpm" in kind:
        kpm = torch.zeros(n, s, dtype=torch.bool)
        kpm[1, -3:] = True
        kpm[2, 0] = True
        if "kpmf" in kind:
            kpm = torch.zeros(n, s).masked_fill(kpm, float("-inf")) + 0.3 * torch.randn(n, s)
    if "attn2b" in kind:
        attn = torch.ones(lq, s, dtype=torch.bool).triu(1)  # causal-like: key 0 always visible
        attn[:, 0] = False
    if "attn3f" in kind:
        attn = torch.randn(n * heads, lq, s)
        attn[:, :, 1] = float("-inf")
    return kpm, attn


MASKS = ["none", "kpm", "kpmf", "attn2b", "attn3f", "kpm-attn2b", "kpmf-attn2b", "kpm-attn3f"]


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("config", list(MHA_CONFIGS))
def test_mha_matches_torch(config, mask):
    kw = MHA_CONFIGS[config]
    cross = "kdim" in kw
    for batch_first in (False, True):
        theirs = nn.MultiheadAttention(E, H, batch_first=batch_first, **kw)
        ours = fnn.MultiheadAttention(E, H, batch_first=batch_first, **kw, backend="torch")
        ours.load_state_dict(theirs.state_dict())
        s = 9 if cross else L
        kpm, attn = _masks(mask, N, L, s, H)

        def mk(length, dim):
            return torch.randn(N, length, dim) if batch_first else torch.randn(length, N, dim)

        if cross:
            inputs = [mk(L, E), mk(s, kw["kdim"]), mk(s, kw["vdim"])]
        else:
            x = mk(L, E)
            inputs = [x, x, x]
        for need_weights, average in ((False, True), (True, True), (True, False)):
            kwargs = dict(key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights,
                          average_attn_weights=average)
            if cross:
                compare_modules(ours, theirs, inputs, kwargs, pick=lambda o: list(o))
            else:
                # self-attention: one tensor for query, key and value (the packed projection)
                def pick(o):
                    return list(o)
                model_ours = _SelfAttn(ours)
                model_theirs = _SelfAttn(theirs)
                compare_modules(model_ours, model_theirs, inputs[:1], kwargs, pick=pick)


class _SelfAttn(nn.Module):
    """Calls an attention module with query is key is value (what TransformerEncoderLayer does)."""

    def __init__(self, mha):
        super().__init__()
        self.mha = mha

    def forward(self, x, **kwargs):
        return self.mha(x, x, x, **kwargs)


@pytest.mark.parametrize("same", ["q-is-k-is-v", "k-is-v", "distinct"])
def test_mha_projection_paths(same):
    theirs = nn.MultiheadAttention(E, H)
    ours = fnn.MultiheadAttention.from_torch(copy.deepcopy(theirs), backend="torch")
    x, y, z = torch.randn(L, N, E), torch.randn(L, N, E), torch.randn(L, N, E)
    args = {"q-is-k-is-v": (x, x, x), "k-is-v": (x, y, y), "distinct": (x, y, z)}[same]
    a, _ = theirs(*args, need_weights=False)
    b, _ = ours(*args, need_weights=False)
    assert_close(b, a.double(), a, atol=1e-5)


def test_mha_float64_tight():
    theirs = nn.MultiheadAttention(E, H, add_bias_kv=True, batch_first=True).double()
    ours = fnn.MultiheadAttention(E, H, add_bias_kv=True, batch_first=True, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(N, L, E, dtype=torch.float64)
    kpm, _ = _masks("kpm", N, L, L + 0, H)
    a, wa = theirs(x, x, x, key_padding_mask=kpm)
    b, wb = ours(x, x, x, key_padding_mask=kpm)
    assert (a - b).abs().max() < 1e-12 and (wa - wb).abs().max() < 1e-12


@pytest.mark.parametrize("kind", ["kpm", "attn3f"])
def test_mha_unbatched(kind):
    theirs = nn.MultiheadAttention(E, H)
    ours = fnn.MultiheadAttention.from_torch(copy.deepcopy(theirs), backend="torch")
    x = torch.randn(L, E)
    kpm, attn = None, None
    if kind == "kpm":
        kpm = torch.zeros(L, dtype=torch.bool)
        kpm[-2:] = True
    else:
        attn = torch.randn(H, L, L)
    for avg in (True, False):
        a, wa = theirs(x, x, x, key_padding_mask=kpm, attn_mask=attn, average_attn_weights=avg)
        b, wb = ours(x, x, x, key_padding_mask=kpm, attn_mask=attn, average_attn_weights=avg)
        assert b.shape == a.shape == (L, E) and wb.shape == wa.shape
        assert_close(b, a.double(), a, atol=1e-5)
        assert_close(wb, wa.double(), wa, atol=1e-5)


def test_mha_is_causal_hint():
    theirs = nn.MultiheadAttention(E, H, batch_first=True)
    ours = fnn.MultiheadAttention.from_torch(copy.deepcopy(theirs), backend="torch")
    x = torch.randn(N, L, E)
    causal = nn.Transformer.generate_square_subsequent_mask(L)  # float, -inf above the diagonal
    a, _ = theirs(x, x, x, attn_mask=causal, need_weights=False, is_causal=True)
    b, _ = ours(x, x, x, attn_mask=causal, need_weights=False, is_causal=True)
    assert_close(b, a.double(), a, atol=1e-5)
    # the hint alone (no mask) is refused, as in torch
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        ours(x, x, x, is_causal=True)


@pytest.mark.parametrize("padding", [False, True], ids=["no-kpm", "kpm"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float64], ids=["bool", "float"])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)],
                         ids=["no-weights", "weights-avg", "weights-per-head"])
def test_mha_is_causal_hint_with_weights_or_padding_keeps_the_mask(need_weights, average, mask_dtype,
                                                                   padding):
    """is_causal=True with the causal attn_mask, in float64 against torch: the hint may replace the
    mask only when neither weights nor a key padding mask are asked for (torch's rule); with
    need_weights the weights path must still apply the mask (a mutant dropping it there survived),
    so the output and the weights (averaged or per head) must match torch's."""
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(E, H, batch_first=True).double()
    ours = fnn.MultiheadAttention.from_torch(copy.deepcopy(theirs), backend="torch")
    x = torch.randn(N, L, E, dtype=torch.float64)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    if mask_dtype != torch.bool:
        causal = torch.zeros(L, L, dtype=mask_dtype).masked_fill(causal, float("-inf"))
    kpm = None
    if padding:  # key 0 stays real: no query row is fully masked (torch would give NaN there)
        kpm = torch.zeros(N, L, dtype=torch.bool)
        kpm[1, -3:] = True
        kpm[2, 2:] = True
    kw = dict(attn_mask=causal, key_padding_mask=kpm, is_causal=True, need_weights=need_weights,
              average_attn_weights=average)
    a, wa = theirs(x, x, x, **kw)
    b, wb = ours(x, x, x, **kw)
    assert (a - b).abs().max() < 1e-12
    if not need_weights:
        assert wa is None and wb is None
        return
    assert wb.shape == wa.shape and (wa - wb).abs().max() < 1e-12
    # the weights are causal: nothing above the diagonal
    assert (wb.triu(1) == 0).all()


def test_mha_fully_masked_rows_give_zero_not_nan():
    """torch gives NaN for a query whose keys are all masked; fastbert gives 0 (and finite grads)."""
    theirs = nn.MultiheadAttention(E, H, batch_first=True)
    ours = fnn.MultiheadAttention.from_torch(copy.deepcopy(theirs), backend="torch")
    x = torch.randn(N, L, E)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1] = True  # batch element 1: every key is padding
    a, wa = theirs(x, x, x, key_padding_mask=kpm)
    assert torch.isnan(a[1]).all()
    xg = x.clone().requires_grad_(True)
    b, wb = ours(xg, xg, xg, key_padding_mask=kpm)
    assert torch.isfinite(b).all() and torch.isfinite(wb).all()
    assert (wb[1] == 0).all()
    # the fully masked rows hold out_proj(0) = out_proj.bias
    assert torch.equal(b[1], ours.out_proj.bias.expand(L, E).detach()) or (
        (b[1] - ours.out_proj.bias).abs().max() < 1e-6)
    assert_close(b[[0, 2]], a[[0, 2]].double(), a[[0, 2]], atol=1e-5)
    b.sum().backward()
    assert torch.isfinite(xg.grad).all()


def test_mha_state_dict_and_constructor_match_torch():
    for kw in MHA_CONFIGS.values():
        torch.manual_seed(0)
        theirs = nn.MultiheadAttention(E, H, **kw)
        torch.manual_seed(0)
        ours = fnn.MultiheadAttention(E, H, **kw)
        sd_t, sd_o = theirs.state_dict(), ours.state_dict()
        assert list(sd_t) == list(sd_o)
        for k in sd_t:  # same initialisation from the same seed
            assert torch.equal(sd_t[k], sd_o[k]), k
        ours.load_state_dict(sd_t, strict=True)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        assert isinstance(ours, nn.MultiheadAttention)


def test_mha_from_torch_keeps_parameter_objects():
    theirs = nn.MultiheadAttention(E, H, add_bias_kv=True, kdim=8, vdim=8)
    ours = fnn.MultiheadAttention.from_torch(theirs)
    for (n1, p1), (n2, p2) in zip(theirs.named_parameters(), ours.named_parameters()):
        assert n1 == n2 and p1 is p2
    assert ours.out_proj is theirs.out_proj
    with pytest.raises(TypeError, match="MultiheadAttention"):
        fnn.MultiheadAttention.from_torch(nn.Linear(2, 2))


class _Doubled(nn.TransformerEncoderLayer):  # a subclass with its own computation
    def forward(self, src, *args, **kwargs):
        return 2 * super().forward(src, *args, **kwargs)


class _OwnBlock(nn.TransformerEncoderLayer):  # overrides a block torch's forward calls
    def _ff_block(self, x):
        return torch.zeros_like(x)


class _Tagged(nn.TransformerEncoderLayer):  # only adds an attribute: computes what torch's does
    tag = "mine"


@pytest.mark.parametrize("cls", [_Doubled, _OwnBlock])
def test_from_torch_refuses_a_subclass_whose_computation_it_would_drop(cls):
    layer = cls(E, H, 24, dropout=0.0, batch_first=True)
    with pytest.raises(TypeError, match="would not run"):
        fnn.TransformerEncoderLayer.from_torch(layer)
    with pytest.raises(TypeError, match="would not run"):  # cloned into each layer, as torch does
        fnn.TransformerEncoder(layer, 2)
    with pytest.raises(TypeError, match="would not run"):
        fnn.TransformerEncoder.from_torch(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))

    class Norm(nn.LayerNorm):
        def forward(self, x):
            return x

    class Attn(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    for make, plain in ((fnn.LayerNorm, Norm(E)), (fnn.MultiheadAttention, Attn(E, H)),
                        (fnn.GELU, type("G", (nn.GELU,), {"forward": lambda self, x: x})())):
        with pytest.raises(TypeError, match="would not run"):
            make.from_torch(plain)


def test_from_torch_takes_a_subclass_that_computes_what_torch_does():
    torch.manual_seed(0)
    layer = _Tagged(E, H, 24, dropout=0.0, batch_first=True).eval()
    ours = fnn.TransformerEncoderLayer.from_torch(layer, backend="torch")
    x = torch.randn(N, L, E)
    assert_close(ours(x), layer(x).double(), atol=1e-5)
    ours_mha = fnn.MultiheadAttention.from_torch(ours.self_attn)  # fastbert's own: its forward
    assert ours_mha.in_proj_weight is layer.self_attn.in_proj_weight


def test_mha_bad_inputs():
    m = fnn.MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(N, L, E)
    with pytest.raises(ValueError, match="query"):
        m(x[None], x[None], x[None])
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, x, x, key_padding_mask=torch.zeros(N, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(L, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="3-D attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(N, L, L, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        m(x, x, x, key_padding_mask=torch.zeros(N, L, dtype=torch.int64))
    with pytest.raises(ValueError, match="embed_dim"):
        m(torch.randn(N, L, E + 1), x, x)
    with pytest.raises(ValueError, match="backend"):
        fnn.MultiheadAttention(E, H, backend="tpu")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_mha_inside_torch_transformer_encoder_layer(train, monkeypatch):
    """fastbert's MHA swapped into torch's layer: same outputs and grads in train and eval mode;
    in train mode (and eval with grad) torch's layer calls our forward."""
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True)
    swapped = copy.deepcopy(layer)
    swapped.self_attn = fnn.MultiheadAttention.from_torch(swapped.self_attn, backend="torch")
    layer.train(train)
    swapped.train(train)
    calls = []
    real = fastbert.ops.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastbert.ops, "scaled_dot_product_attention", spy)
    x = torch.randn(N, L, E)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[0, -2:] = True
    compare_modules(swapped, layer, [x], {"src_key_padding_mask": kpm})
    assert calls, "fastbert attention was not called"
    if not train:
        # eval + no grad: torch's fused fast path reads the parameters itself; same result
        with torch.no_grad():
            a, b = layer(x, src_key_padding_mask=kpm), swapped(x, src_key_padding_mask=kpm)
        real_rows = ~kpm
        assert_close(b[real_rows], a[real_rows].double(), a[real_rows], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# TransformerEncoderLayer
# ----------------------------------------------------------------------------------------------
TEL_CASES = {
    "post-relu": dict(),
    "post-gelu": dict(activation="gelu"),
    "pre-relu": dict(norm_first=True),
    "pre-gelu": dict(norm_first=True, activation=F.gelu),
    "post-nngelu-tanh": dict(activation=nn.GELU(approximate="tanh")),
    "pre-silu-nobias": dict(norm_first=True, activation=F.silu, bias=False),
    "seqfirst": dict(batch_first=False),
}


@pytest.mark.parametrize("masks", ["none", "kpm", "kpm-attn2b", "attn3f"])
@pytest.mark.parametrize("case", list(TEL_CASES))
def test_transformer_encoder_layer_matches_torch(case, masks):
    kw = dict(batch_first=True, dim_feedforward=40, dropout=0.0)
    kw.update(TEL_CASES[case])
    torch.manual_seed(0)
    theirs = nn.TransformerEncoderLayer(E, H, **kw)
    torch.manual_seed(0)
    ours = fnn.TransformerEncoderLayer(E, H, **kw, backend="torch")
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k  # same init from the same seed
    kpm, attn = _masks(masks, N, L, L, H)
    x = torch.randn(N, L, E) if kw["batch_first"] else torch.randn(L, N, E)
    for train in (True, False):  # dropout 0: train and eval must both match
        theirs.train(train)
        ours.train(train)
        compare_modules(ours, theirs, [x], {"src_key_padding_mask": kpm, "src_mask": attn})


def test_transformer_encoder_layer_unbatched_and_causal():
    theirs = nn.TransformerEncoderLayer(E, H, dim_feedforward=24, dropout=0.0)
    ours = fnn.TransformerEncoderLayer.from_torch(copy.deepcopy(theirs), backend="torch")
    x = torch.randn(L, E)
    compare_modules(ours, theirs, [x])
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    compare_modules(ours, theirs, [torch.randn(L, N, E)], {"src_mask": causal, "is_causal": True})


def test_transformer_encoder_layer_in_torch_encoder_eval_with_padding():
    """Inside torch.nn.TransformerEncoder: torch's reference runs its nested-tensor fast path
    (padding positions come out 0); compare the real tokens."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, batch_first=True)
    theirs = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    ours = nn.TransformerEncoder(fnn.TransformerEncoderLayer(E, H, dim_feedforward=32, batch_first=True,
                                                             backend="torch"), 2,
                                 enable_nested_tensor=False).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(N, L, E)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1, 4:] = True
    with torch.no_grad():
        a, b = theirs(x, src_key_padding_mask=kpm), ours(x, src_key_padding_mask=kpm)
    real = ~kpm
    assert_close(b[real], a[real].double(), a[real], atol=1e-5)


def test_transformer_encoder_layer_dropout_train_mode():
    ours = fnn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.3, batch_first=True,
                                       backend="torch")
    x = torch.randn(N, L, E)
    ours.eval()
    ev = ours(x)
    ours.train()
    torch.manual_seed(5)
    t1 = ours(x)
    torch.manual_seed(5)
    t2 = ours(x)
    assert torch.equal(t1, t2), "dropout must be reproducible under torch.manual_seed"
    assert (t1 - ev).abs().max() > 1e-3, "dropout had no effect in train mode"
    t1.sum().backward()
    assert all(p.grad is not None for p in ours.parameters())


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
@pytest.mark.parametrize("site", ["self_attn", "dropout", "dropout1", "dropout2"])
def test_transformer_encoder_layer_each_dropout_site_acts_in_train_mode(site, norm_first):
    """One dropout site on, every other at 0: train output differs from eval (the test above
    passes as long as any one site works)."""
    ours = fnn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True,
                                       norm_first=norm_first, backend="torch")
    if site == "self_attn":
        ours.self_attn.dropout = 0.5
    else:
        getattr(ours, site).p = 0.5
    x = torch.randn(N, L, E)
    with torch.no_grad():
        ev = ours.eval()(x)
        tr = ours.train()(x)
    assert (tr - ev).abs().max() > 1e-3, f"{site} had no effect in train mode"


class _LoRALinear(nn.Module):
    """A LoRA adapter in a Linear's place (the shape of peft's lora.Linear)."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, dtype=base.weight.dtype)
        nn.init.normal_(self.lora_B.weight)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


class _DoubledLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return 2 * super().forward(x)


def _double_norm(m, name):
    old = getattr(m, name)
    new = _DoubledLayerNorm(old.normalized_shape, old.eps, dtype=old.weight.dtype)
    new.load_state_dict(old.state_dict())
    setattr(m, name, new)


def _prune_then_step(linear):
    """Pruning recomputes ``weight`` from ``weight_orig`` in a pre-hook: an update of weight_orig
    (an optimizer step) reaches only a module that runs its hooks."""
    torch.nn.utils.prune.l1_unstructured(linear, "weight", amount=0.5)
    with torch.no_grad():
        linear.weight_orig.mul_(1.5)


SUBLAYER_EDITS = {  # made on a layer after it is converted (as peft or a user would, after optimize)
    "lora-linear1": lambda m: setattr(m, "linear1", _LoRALinear(m.linear1)),
    "lora-linear2": lambda m: setattr(m, "linear2", _LoRALinear(m.linear2)),
    "subclass-norm1": lambda m: _double_norm(m, "norm1"),
    "subclass-norm2": lambda m: _double_norm(m, "norm2"),
    "hooked-norm2": lambda m: m.norm2.register_forward_hook(lambda mod, i, o: 3 * o),
    "pre-hooked-linear1": lambda m: m.linear1.register_forward_pre_hook(lambda mod, i: (i[0] * 0.5,)),
    "pruned-linear2": lambda m: _prune_then_step(m.linear2),
    "hooked-dropout1": lambda m: m.dropout1.register_forward_hook(lambda mod, i, o: 2 * o),
    "hooked-dropout2": lambda m: m.dropout2.register_forward_hook(lambda mod, i, o: -o),
    "hooked-self_attn": lambda m: m.self_attn.register_forward_hook(lambda mod, i, o: (2 * o[0], o[1])),
    "instance-forward-linear2": lambda m: setattr(m.linear2, "forward",
                                                  lambda x, f=m.linear2.forward: f(x).tanh()),
}


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
@pytest.mark.parametrize("edit", list(SUBLAYER_EDITS))
def test_transformer_encoder_layer_calls_sublayers_that_do_not_run_plainly(edit, norm_first):
    """A LoRA adapter, a LayerNorm subclass, a hook, pruning or an instance forward on a sublayer:
    the fastbert layer calls it (fusing only what runs plainly), so it computes what torch's layer
    computes: outputs and every gradient, float64, with a padding mask."""
    import torch.nn.utils.prune  # noqa: F401  (SUBLAYER_EDITS)

    torch.manual_seed(0)
    theirs = nn.TransformerEncoderLayer(E, H, dim_feedforward=24, dropout=0.0, activation="gelu",
                                        batch_first=True, norm_first=norm_first, dtype=torch.float64)
    ours = fnn.TransformerEncoderLayer.from_torch(copy.deepcopy(theirs), backend="torch")
    for m in (theirs, ours):
        torch.manual_seed(1)
        SUBLAYER_EDITS[edit](m)
    x = torch.randn(N, L, E, dtype=torch.float64)
    kpm, _ = _padding(N, L)
    g = torch.randn(N, L, E, dtype=torch.float64)
    outs, grads = [], []
    for m in (theirs, ours):
        xi = x.clone().requires_grad_()
        out = m(xi, src_key_padding_mask=kpm)
        out.backward(g)
        outs.append(out.detach())
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    torch.testing.assert_close(outs[1], outs[0])
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(b, a)


def test_transformer_encoder_layer_calls_a_hooked_or_subclassed_gelu():
    """A GELU module activation is fused into bias_gelu only where it runs plainly: a hooked one,
    or a subclass with its own forward, is called (torch calls it)."""
    class SteeperGELU(nn.GELU):
        def forward(self, x):
            return super().forward(2 * x)

    for make in (lambda: SteeperGELU(), lambda: nn.GELU()):
        torch.manual_seed(0)
        theirs = nn.TransformerEncoderLayer(E, H, dim_feedforward=24, dropout=0.0, activation=make(),
                                            batch_first=True, dtype=torch.float64)
        ours = fnn.TransformerEncoderLayer.from_torch(copy.deepcopy(theirs), backend="torch")
        if type(theirs.activation) is nn.GELU:
            for m in (theirs, ours):
                m.activation.register_forward_hook(lambda mod, i, o: o * 3)
        x = torch.randn(N, L, E, dtype=torch.float64)
        torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_transformer_encoder_layer_dropouts_follow_their_own_mode(norm_first):
    """Each nn.Dropout acts in its own training mode, as when called: an eval-mode layer with its
    Dropout modules switched on (Monte-Carlo dropout) drops; a train-mode layer with them off (and
    the attention's dropout 0) is deterministic and equals eval."""
    ours = fnn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.3, batch_first=True,
                                       norm_first=norm_first, backend="torch")
    x = torch.randn(N, L, E)
    drops = [ours.dropout, ours.dropout1, ours.dropout2]
    with torch.no_grad():
        ev = ours.eval()(x)
        for d in drops:
            d.train()
        for d in drops:  # each one alone
            for other in drops:
                other.p = 0.3 if other is d else 0.0
            assert (ours(x) - ev).abs().max() > 1e-3, "a Dropout in training mode had no effect"
        ours.train()
        ours.self_attn.dropout = 0.0
        for d in drops:
            d.p = 0.3
            d.eval()
        assert torch.equal(ours(x), ev)


def test_transformer_encoder_layer_with_a_subclassed_self_attn_is_refused():
    class MyAttention(nn.MultiheadAttention):
        pass

    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=24, batch_first=True)
    layer.self_attn = MyAttention(E, H, batch_first=True)
    with pytest.raises(TypeError, match="self_attn is a .*MyAttention, not torch.nn.MultiheadAttention"):
        fnn.TransformerEncoderLayer.from_torch(layer)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    report = fastbert.optimize(model, padding_free=True)
    assert not any(isinstance(m, (fnn.TransformerEncoderLayer, fnn.TransformerEncoder)) for m in model.modules())
    assert any("self_attn" in s.reason and "MyAttention" in s.reason for s in report.left), report


def test_transformer_encoder_runs_hooked_layers_padded():
    """A hook on a layer (or its self_attn) of a padding-free encoder runs: those calls take the
    padded path, where the layers are called."""
    torch.manual_seed(0)
    ours = fnn.TransformerEncoder(fnn.TransformerEncoderLayer(E, H, dim_feedforward=24, dropout=0.0,
                                                              batch_first=True, backend="torch"), 2)
    x = torch.randn(N, L, E)
    kpm, _ = _padding(N, L)
    real = ~kpm
    plain = ours(x, src_key_padding_mask=kpm)
    for module in (ours.layers[1], ours.layers[0].self_attn):
        seen = []
        handle = module.register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
        torch.testing.assert_close(ours(x, src_key_padding_mask=kpm)[real], plain[real])
        handle.remove()
        assert seen == [type(module).__name__]


def test_transformer_encoder_layer_bad_inputs():
    m = fnn.TransformerEncoderLayer(E, H, batch_first=True)
    with pytest.raises(ValueError, match="src_key_padding_mask"):
        m(torch.randn(N, L, E), src_key_padding_mask=torch.zeros(N, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="src_mask"):
        m(torch.randn(N, L, E), src_mask=torch.zeros(L, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="src"):
        m(torch.randn(2, N, L, E))
    with pytest.raises(RuntimeError, match="relu/gelu"):
        fnn.TransformerEncoderLayer(E, H, activation="tanh")


# ----------------------------------------------------------------------------------------------
# TransformerEncoder (padding-free with a key padding mask)
# ----------------------------------------------------------------------------------------------
def _torch_encoder(norm_first=False, batch_first=True, e=E, h=H, dropout=0.0, layers=2):
    layer = nn.TransformerEncoderLayer(e, h, dim_feedforward=24, dropout=dropout, activation="gelu",
                                       batch_first=batch_first, norm_first=norm_first)
    return nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(e), enable_nested_tensor=False)


def _padding(n, s, holes=False, float_mask=False):
    """A key padding mask (True = padded), no row fully padded; ``holes``: real tokens with gaps."""
    kpm = torch.zeros(n, s, dtype=torch.bool)
    kpm[1, s // 2:] = True
    kpm[2, 1:] = True  # one real token
    if holes:
        kpm[0, 1:3] = True
    if float_mask:
        return kpm, torch.zeros(n, s).masked_fill(kpm, float("-inf"))
    return kpm, kpm


def _encoder_check(ours, theirs, x, kpm_bool, kwargs, device="cpu"):
    """ours (padding-free) vs theirs in float64 (reference) and in x's dtype, on the real tokens;
    0 at padded positions; gradients of the input and of every parameter, for one upstream
    gradient that is 0 at padded positions (no real token depends on them)."""
    batch_first = ours.layers[0].self_attn.batch_first
    bf = (lambda t: t) if batch_first else (lambda t: t.transpose(0, 1))
    real = (~kpm_bool).to(device)
    ref64 = copy.deepcopy(theirs).double().to(device)
    theirs, ours = theirs.to(device), ours.to(device)
    xs = [x.to(device).clone().requires_grad_(True) for _ in range(2)] + [
        x.to(device).double().requires_grad_(True)]
    kw64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()}
    outs = [ours(xs[0], **kwargs), theirs(xs[1], **kwargs), ref64(xs[2], **kw64)]
    out, low, ref = (bf(o) for o in outs)
    assert_close(out[real], ref[real], low[real], name="output (real tokens)")
    assert (out[~real] == 0).all(), "padded positions must be 0"
    g = torch.randn(ref.shape, dtype=torch.float64, device=device) * real[..., None]
    for o in (out, low, ref):
        o.backward(g.to(o.dtype) if batch_first else g.to(o.dtype))
    assert_close(xs[0].grad, xs[2].grad, xs[1].grad, name="grad src")
    p_low, p_ref = dict(theirs.named_parameters()), dict(ref64.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, p_ref[name].grad, p_low[name].grad, name=f"grad {name}")


@pytest.mark.parametrize("masks", ["kpm", "kpm-holes", "kpm-float", "kpm-causal"])
@pytest.mark.parametrize("norm_first,batch_first", [(False, True), (True, True), (False, False)],
                         ids=["post", "pre", "seqfirst"])
def test_transformer_encoder_padding_free_matches_torch(norm_first, batch_first, masks):
    """fastbert.nn.TransformerEncoder (from_torch) in train mode against torch's padded path: the
    real tokens and every gradient as close to float64 as torch's float32; 0 at padded positions."""
    torch.manual_seed(0)
    theirs = _torch_encoder(norm_first, batch_first)
    ours = fnn.TransformerEncoder.from_torch(copy.deepcopy(theirs), backend="torch")
    assert list(ours.state_dict()) == list(theirs.state_dict())
    kpm_bool, kpm = _padding(N, L, holes="holes" in masks, float_mask="float" in masks)
    kwargs = {"src_key_padding_mask": kpm}
    if "causal" in masks:
        kwargs["mask"] = nn.Transformer.generate_square_subsequent_mask(L)
    x = torch.randn(N, L, E) if batch_first else torch.randn(L, N, E)
    _encoder_check(ours, theirs, x, kpm_bool, kwargs)


def test_transformer_encoder_runs_the_layers_packed(monkeypatch):
    """With a padding mask every layer runs forward_packed (no padded layer call); without one, or
    with a mask that is not causal, a float padding mask holding a bias, or padding_free=False,
    the layers run on the padded batch, exactly as a loop over them."""
    torch.manual_seed(0)
    ours = fnn.TransformerEncoder(fnn.TransformerEncoderLayer(E, H, dim_feedforward=24, dropout=0.0,
                                                              batch_first=True, backend="torch"), 3)
    calls = {"packed": 0, "padded": 0}
    packed_fn, padded_fn = fnn.TransformerEncoderLayer.forward_packed, fnn.TransformerEncoderLayer.forward

    def packed(self, *a, **k):
        calls["packed"] += 1
        return packed_fn(self, *a, **k)

    def padded(self, *a, **k):
        calls["padded"] += 1
        return padded_fn(self, *a, **k)

    monkeypatch.setattr(fnn.TransformerEncoderLayer, "forward_packed", packed)
    monkeypatch.setattr(fnn.TransformerEncoderLayer, "forward", padded)
    x = torch.randn(N, L, E)
    kpm, _ = _padding(N, L)
    ours(x, src_key_padding_mask=kpm)
    assert calls == {"packed": 3, "padded": 0}

    def loop(**kw):
        out = x
        for layer in ours.layers:
            out = padded_fn(layer, out, **kw)
        return out

    bias = torch.zeros(N, L).masked_fill(kpm, -1.5)  # a float "padding" mask that is a bias
    attn = torch.randn(L, L)
    ours.padding_free = False
    for kw in ({"src_key_padding_mask": kpm},):
        assert torch.equal(ours(x, **kw), loop(**kw))
    ours.padding_free = True
    for kw, layer_kw in (({}, {}), ({"src_key_padding_mask": bias}, {"src_key_padding_mask": bias}),
                         ({"src_key_padding_mask": kpm, "mask": attn},
                          {"src_key_padding_mask": kpm, "src_mask": attn})):
        calls.update(packed=0, padded=0)
        assert torch.equal(ours(x, **kw), loop(**layer_kw))
        assert calls["packed"] == 0
    with pytest.raises(RuntimeError, match="attn_mask"):  # torch's error for a causal hint alone
        ours(x, src_key_padding_mask=kpm, is_causal=True)


def test_transformer_encoder_constructor_and_errors():
    """torch's constructor: the layer cloned num_layers times (a torch layer converted), the same
    state_dict keys as torch's encoder; a fully padded sequence gives 0, not NaN."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=24, batch_first=True)
    ours = fnn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(E), backend="torch")
    theirs = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(E), enable_nested_tensor=False)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.layers[0] is not ours.layers[1] and isinstance(ours.layers[0], fnn.TransformerEncoderLayer)
    assert ours.layers[0].self_attn.in_proj_weight is not layer.self_attn.in_proj_weight  # cloned
    ours.load_state_dict(theirs.state_dict())
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1] = True
    out = ours.eval()(torch.randn(N, L, E), src_key_padding_mask=kpm)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    with pytest.raises(TypeError, match="encoder_layer"):
        fnn.TransformerEncoder(nn.Linear(E, E), 2)
    with pytest.raises(ValueError, match="num_layers"):
        fnn.TransformerEncoder(layer, 0)
    with pytest.raises(TypeError, match="padding_free"):
        fnn.TransformerEncoder(layer, 1, padding_free=1)
    with pytest.raises(TypeError, match="torch.nn.TransformerEncoder"):
        fnn.TransformerEncoder.from_torch(layer)
    with pytest.raises(ValueError, match="d_model"):
        ours(torch.randn(N, L, E + 1), src_key_padding_mask=kpm)
    # backend reaches the clones of a fastbert layer (and every fastbert module inside them)
    built = fnn.TransformerEncoder(fnn.TransformerEncoderLayer(E, H, dim_feedforward=24), 2, backend="torch")
    assert {m.backend for m in built.modules() if hasattr(m, "backend")} == {"torch"}
    kept = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, dim_feedforward=24), 1, enable_nested_tensor=False)
    kept.layers[0] = fnn.TransformerEncoderLayer(E, H, dim_feedforward=24)
    with pytest.raises(ValueError, match="kept as it is"):
        fnn.TransformerEncoder.from_torch(kept, backend="torch")
    assert fnn.TransformerEncoder.from_torch(kept).layers[0] is kept.layers[0]


def test_torchscript_is_refused_clearly():
    """torch.jit.script of a fastbert module, or of a model holding one: NotImplementedError naming
    the module and the alternatives, not an error from inside TorchScript's compiler."""
    for module in (fnn.LayerNorm(E), fnn.GELU(), fnn.MultiheadAttention(E, H),
                   nn.Sequential(nn.Linear(E, E), fnn.TransformerEncoderLayer(E, H, dim_feedforward=24))):
        with pytest.raises(NotImplementedError, match="TorchScript.*torch.compile"):
            torch.jit.script(module)


def test_transformer_encoder_triton():
    need_triton("varlen_attention", "add_layer_norm", "bias_gelu", "layer_norm")
    torch.manual_seed(0)
    for norm_first in (False, True):
        theirs = _torch_encoder(norm_first, e=32, h=2)  # head dim 16
        ours = fnn.TransformerEncoder.from_torch(copy.deepcopy(theirs), backend="triton")
        kpm, _ = _padding(N, 17, holes=True)
        run_triton(lambda: _encoder_check(ours, theirs, torch.randn(N, 17, 32), kpm,
                                          {"src_key_padding_mask": kpm.to(DEVICE)}, device=DEVICE))


def test_transformer_encoder_compiles_as_one_graph():
    """torch.compile(fullgraph=True) of the padding-free encoder, unpadding included (Dynamo told to
    capture data-dependent shapes), on two batches of other lengths."""
    need_triton("varlen_attention", "add_layer_norm", "bias_gelu")
    from fastbert.testing import assert_compiled_encoder_matches
    torch.manual_seed(0)
    layer = fnn.TransformerEncoderLayer(32, 2, 32, dropout=0.0, activation="gelu", batch_first=True,
                                        backend="triton")
    enc = fnn.TransformerEncoder(layer, 2).to(DEVICE).eval()
    batches = []
    for holes in (False, True):
        kpm, _ = _padding(N, 9, holes=holes)
        batches.append((torch.randn(N, 9, 32, device=DEVICE), kpm.to(DEVICE)))
    assert_compiled_encoder_matches(enc, batches, mask_arg="src_key_padding_mask")


@pytest.mark.parametrize("case,compiler", [("bool", "aot_eager"), ("causal-hinted", "aot_eager"),
                                           ("causal", "aot_eager"), ("float", "aot_eager"),
                                           ("bool", "inductor"), ("prenorm-dynamic", "aot_eager")])
def test_transformer_encoder_compiles_as_one_graph_torch_backend(case, compiler):
    """fullgraph=True on backend="torch" with every kind of mask the padding-free path takes
    (aot_eager: the graph, without a C++ compiler run; Inductor once: its matmul lowering must not
    branch on the packed sizes), and a pre-norm layer with dynamic=True: equal to eager on the real
    tokens. A float padding mask, or a causal mask without the is_causal hint, cannot have its
    values read under torch.compile: those run the padded path there (padded positions then differ
    from eager's 0)."""
    import torch._dynamo
    torch.manual_seed(0)
    layer = fnn.TransformerEncoderLayer(32, 2, 32, dropout=0.0, activation="gelu", batch_first=True,
                                        backend="torch", norm_first=case.startswith("prenorm"))
    enc = fnn.TransformerEncoder(layer, 2).eval()
    x = torch.randn(2, 6, 32)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[0, 4:] = True
    kw = {"src_key_padding_mask": kpm}
    if case.startswith("causal"):
        kw["mask"] = nn.Transformer.generate_square_subsequent_mask(6)
        kw["is_causal"] = case == "causal-hinted" or None
    if case == "float":
        kw["src_key_padding_mask"] = torch.zeros(2, 6).masked_fill(kpm, float("-inf"))
    torch._dynamo.reset()
    try:
        with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True,
                                                         capture_scalar_outputs=True):
            out = torch.compile(enc, backend=compiler, fullgraph=True,
                                dynamic=True if case.endswith("dynamic") else None)(x, **kw)
            want = enc(x, **kw)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out[~kpm], want[~kpm], rtol=1e-5, atol=1e-5)
    if case in ("bool", "causal-hinted", "prenorm-dynamic"):
        assert (out[kpm] == 0).all()


def test_transformer_encoder_exports_with_its_unpadding():
    """torch.export (non-strict, the default, and strict) of the padding-free encoder: the packed
    length and max_seqlen are symbols there (unpad_input must not specialise them)."""
    torch.manual_seed(0)

    class Wrapped(nn.Module):
        def __init__(self, enc):
            super().__init__()
            self.enc = enc

        def forward(self, x, pad):
            return self.enc(x, src_key_padding_mask=pad)

    layer = fnn.TransformerEncoderLayer(16, 4, 32, batch_first=True, backend="torch")
    model = Wrapped(fnn.TransformerEncoder(layer, 2)).eval()
    x = torch.randn(2, 6, 16)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    for strict in (False, True):
        program = torch.export.export(model, (x, pad), strict=strict)
        torch.testing.assert_close(program.module()(x, pad), model(x, pad))


def test_prenorm_layer_keeps_the_autocast_dtype():
    """Under autocast a pre-LN layer returns what torch's returns (bf16 here): linear2's fp32 bias
    must not promote the feed-forward output."""
    torch.manual_seed(0)
    theirs = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=True).eval()
    ours = fnn.TransformerEncoderLayer.from_torch(copy.deepcopy(theirs), backend="torch").eval()
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        want, got = theirs(x), ours(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=0.1, rtol=0.05)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_transformer_encoder_half(dtype):
    torch.manual_seed(0)
    theirs = _torch_encoder(True, e=256, h=4)  # head dim 64
    ours = fnn.TransformerEncoder.from_torch(copy.deepcopy(theirs))
    kpm = torch.zeros(4, 130, dtype=torch.bool)
    kpm[1, 97:] = True
    kpm[3, 17:] = True
    _encoder_check(ours.to(dtype), theirs.to(dtype), torch.randn(4, 130, 256, dtype=dtype), kpm,
                   {"src_key_padding_mask": kpm.cuda()}, device="cuda")


# ----------------------------------------------------------------------------------------------
# LayerNorm, GELU
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,normalized,kw", [
    ((3, 17), 17, {}),
    ((2, 5, 97), (97,), {"eps": 1e-6}),
    ((4, 3, 8), (3, 8), {}),
    ((5, 16), 16, {"elementwise_affine": False}),
    ((5, 16), 16, {"bias": False}),
], ids=["17", "97-eps", "2d-shape", "no-affine", "no-bias"])
def test_layer_norm_matches_torch(shape, normalized, kw):
    theirs = nn.LayerNorm(normalized, **kw)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    ours = fnn.LayerNorm.from_torch(copy.deepcopy(theirs), backend="torch")
    assert isinstance(ours, nn.LayerNorm)
    compare_modules(ours, theirs, [torch.randn(shape)])
    fresh = fnn.LayerNorm(normalized, **kw)
    assert list(fresh.state_dict()) == list(theirs.state_dict())


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_torch(approximate):
    compare_modules(fnn.GELU(approximate, backend="torch"), nn.GELU(approximate),
                    [torch.randn(3, 5, 17) * 3])
    g = fnn.GELU.from_torch(nn.GELU(approximate))
    assert g.approximate == approximate and isinstance(g, nn.GELU)


class _TorchGEGLU(nn.Module):
    def __init__(self, approximate):
        super().__init__()
        self.approximate = approximate

    def forward(self, x):
        a, g = x.chunk(2, dim=-1)
        return F.gelu(a, approximate=self.approximate) * g


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_geglu_module(approximate):
    m = fnn.GEGLU(approximate, backend="torch")
    compare_modules(m, _TorchGEGLU(approximate), [torch.randn(3, 5, 34) * 3])
    assert m.state_dict() == {} and f"approximate={approximate!r}" in repr(m)
    with pytest.raises(ValueError, match="approximate must be 'none'"):
        fnn.GEGLU("erf")


# ----------------------------------------------------------------------------------------------
# BlockSparseSelfAttention, LinformerSelfAttention
# ----------------------------------------------------------------------------------------------
def _mha_twin(module):
    """A torch MultiheadAttention with the same in/out projections (the names match)."""
    mha = nn.MultiheadAttention(module.embed_dim, module.num_heads, batch_first=module.batch_first,
                                bias=module.in_proj_bias is not None)
    sd = {k: v for k, v in module.state_dict().items() if k.startswith(("in_proj", "out_proj"))}
    mha.load_state_dict(sd)
    return mha


class _MaskedMHA(nn.Module):
    """torch MHA with a fixed token mask (True = do not attend): the dense twin of a sparse layer."""

    def __init__(self, mha, blocked):
        super().__init__()
        self.mha, self.blocked = mha, blocked

    def forward(self, x, key_padding_mask=None):
        return self.mha(x, x, x, key_padding_mask=key_padding_mask, attn_mask=self.blocked,
                        need_weights=False)[0]


@pytest.mark.parametrize("preset,kwargs,bs,length", [
    ("dense", {}, 4, 17),
    ("sliding_window", {"window": 1}, 4, 17),
    ("global_tokens", {"window": 1, "global_blocks": 1}, 3, 13),
    ("bigbird", {"window": 1, "global_blocks": 1, "random_blocks": 1, "seed": 3}, 4, 21),
    ("fixed", {"stride": 2}, 4, 16),
    ("strided", {"stride": 2}, 2, 11),
], ids=lambda v: v if isinstance(v, str) else None)
def test_block_sparse_preset_matches_masked_mha(preset, kwargs, bs, length):
    torch.manual_seed(0)
    ours = fnn.BlockSparseSelfAttention(E, H, preset, block_size=bs, layout_kwargs=kwargs,
                                        backend="torch")
    layout = getattr(fastbert.sparsity, preset)(length, bs, **kwargs)
    keep = reference.layout_to_mask(layout, bs, length, length)[0]  # [L, L], True = attend
    theirs = _MaskedMHA(_mha_twin(ours), ~keep)
    kpm = torch.zeros(N, length, dtype=torch.bool)
    kpm[1, -3:] = True
    x = torch.randn(N, length, E)
    # every query sees its own block (all presets keep the diagonal), and key 0 is never padding
    compare_modules(_SparseAsMHA(ours), theirs, [x], {"key_padding_mask": kpm},
                    check_param_grads=False)
    assert torch.equal(ours.layout_for(length, x.device), layout)
    assert ours.layout_for(length, x.device) is ours.layout_for(length, x.device)  # cached


class _SparseAsMHA(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x, key_padding_mask=None):
        return self.m(x, key_padding_mask=key_padding_mask)


def test_block_sparse_layout_tensor_per_head_and_shorter_input():
    torch.manual_seed(0)
    nb, bs = 5, 4
    layout = torch.rand(H, nb, nb) < 0.5
    layout |= torch.eye(nb, dtype=torch.bool)  # every row sees something
    ours = fnn.BlockSparseSelfAttention(E, H, layout, block_size=bs, backend="torch",
                                        batch_first=False)
    assert "layout" in ours.state_dict()
    for length in (nb * bs, 13):  # full coverage, and a shorter input using the top-left corner
        x = torch.randn(length, N, E)
        out = ours(x)
        lay = layout[:, :-(-length // bs), :-(-length // bs)]
        q, k, v = F.linear(x.transpose(0, 1), ours.in_proj_weight, ours.in_proj_bias).view(
            N, length, 3, H, E // H).unbind(2)
        ref = reference.block_sparse_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               lay, bs)
        ref = ours.out_proj(ref.transpose(1, 2).reshape(N, length, E)).transpose(0, 1)
        assert_close(out, ref.double(), ref, atol=1e-5)
    with pytest.raises(ValueError, match="too few"):
        ours(torch.randn(nb * bs + 1, N, E))


def test_block_sparse_global_blocks_past_a_short_input():
    """Global blocks (BigBird's usual 2, or listed indices) past the end of an input are left out
    for it, as those tokens are not there: the module is built and serves short and long inputs."""
    bs = 4
    for preset, kwargs in (("global_tokens", {"global_blocks": 2}),
                           ("bigbird", {"global_blocks": [0, 3], "random_blocks": 1}),
                           ("longformer", {"global_blocks": torch.tensor([3])})):
        ours = fnn.BlockSparseSelfAttention(E, H, preset, block_size=bs, layout_kwargs=kwargs,
                                            backend="torch")
        fn = getattr(fastbert.sparsity, preset)
        g = kwargs["global_blocks"]
        for length, nb in ((3, 1), (7, 2), (16, 4), (21, 6)):
            want = min(g, nb) if isinstance(g, int) else [i for i in (g.tolist() if torch.is_tensor(g) else g) if i < nb]
            expected = fn(length, bs, **dict(kwargs, global_blocks=want))
            assert torch.equal(ours.layout_for(length, torch.device("cpu")), expected), (preset, length)
            assert ours(torch.randn(N, length, E)).shape == (N, length, E)
    with pytest.raises(ValueError, match="out of range"):  # a negative index is still an error
        fnn.BlockSparseSelfAttention(E, H, "bigbird", block_size=bs, layout_kwargs={"global_blocks": [-1]})
    with pytest.raises(TypeError, match="global_blocks"):
        fnn.BlockSparseSelfAttention(E, H, "bigbird", block_size=bs, layout_kwargs={"global_blocks": 1.5})


def test_block_sparse_module_cache_follows_kwargs_buffer_and_pickles():
    import io

    m = fnn.BlockSparseSelfAttention(E, H, "sliding_window", block_size=4,
                                     layout_kwargs={"window": 2}, dropout=0.1, backend="torch")
    assert "layout_kwargs={'window': 2}" in repr(m) and "dropout=0.1" in repr(m)
    first = m.layout_for(24, torch.device("cpu"))
    m.layout_kwargs["window"] = 0  # edited after a forward: takes effect
    assert torch.equal(m.layout_for(24, torch.device("cpu")), fastbert.sparsity.sliding_window(24, 4, window=0))
    assert not torch.equal(first, m.layout_for(24, torch.device("cpu")))
    buf = io.BytesIO()
    torch.save(m, buf)  # the cache holds weak references: not pickled
    buf.seek(0)
    assert torch.load(buf, weights_only=False)(torch.randn(N, 24, E)).shape == (N, 24, E)
    t = fnn.BlockSparseSelfAttention(E, H, torch.eye(6, dtype=torch.bool)[None], block_size=4,
                                     backend="torch")
    old = t.layout_for(24, torch.device("cpu"))
    t.layout = torch.ones(1, 6, 6, dtype=torch.bool)  # a new buffer object: never a stale hit
    assert t.layout_for(24, torch.device("cpu")).all() and not old.all()
    assert copy.deepcopy(t)(torch.randn(N, 24, E)).shape == (N, 24, E)


def test_block_sparse_module_layout_cache_is_per_block_count_and_bounded():
    cpu = torch.device("cpu")
    t = fnn.BlockSparseSelfAttention(E, H, torch.rand(1, 200, 200) < 0.5, block_size=2,
                                     backend="torch")
    p = fnn.BlockSparseSelfAttention(E, H, "bigbird", block_size=2, backend="torch")
    for m in (t, p):
        # lengths of the same block count share one layout object (one preparation)
        assert m.layout_for(9, cpu) is m.layout_for(10, cpu)
        assert m.layout_for(9, cpu) is not m.layout_for(11, cpu)
        for length in range(1, 401):  # dynamic padding: every length once
            lay = m.layout_for(length, cpu)
            assert lay.shape[1:] == (-(-length // 2),) * 2
        assert len(m._layouts) == 64  # the most recently used only
    assert torch.equal(t.layout_for(397, cpu), t.layout[:, :199, :199])
    assert torch.equal(p.layout_for(397, cpu), fastbert.sparsity.bigbird(397, 2))


def test_block_sparse_module_honours_later_edits():
    cpu = torch.device("cpu")
    x = torch.randn(N, 24, E)
    m = fnn.BlockSparseSelfAttention(E, H, "sliding_window", block_size=4, backend="torch")
    before = m(x)
    m.block_size = 8  # edited after a forward: the layout is rebuilt for it
    assert m.layout_for(24, cpu).shape == (1, 3, 3)
    m.block_size = 4
    m.layout = torch.zeros(1, 6, 6, dtype=torch.bool)  # a layout given to a preset module is used
    assert torch.equal(m.layout_for(24, cpu), m.layout) and "tensor(1, 6, 6)" in repr(m)
    after = m(x)
    assert not torch.equal(before, after)
    assert torch.allclose(after, m.out_proj.bias.expand_as(after))  # no query sees a key
    m.block_size = 0
    with pytest.raises(ValueError, match="block_size"):
        m(x)
    with pytest.raises(ValueError, match="seq_len"):
        m.layout_for(-20, cpu)
    with pytest.raises(ValueError, match="block_size"):
        fnn.BlockSparseSelfAttention(E, H, block_size=2 ** 40)


@pytest.mark.parametrize("make", [
    lambda: fnn.BlockSparseSelfAttention(E, H, backend="torch"),
    lambda: fnn.LinformerSelfAttention(E, H, max_seq_len=32, k=4, backend="torch"),
], ids=["block_sparse", "linformer"])
def test_self_attention_key_padding_mask_must_match_the_batch(make):
    """A key_padding_mask of shape (1, L) (or (N, L'), or (L,)) for a batch of N > 1 is refused
    with ValueError naming the argument and the expected (N, L), in both layouts: broadcasting one
    row over the batch would silently pad every sequence alike (a mutant without the check
    survived)."""
    torch.manual_seed(0)
    m = make()
    length = 32
    for batch_first in (True, False):
        m.batch_first = batch_first
        x = torch.randn(N, length, E) if batch_first else torch.randn(length, N, E)
        for shape in ((1, length), (N, length - 1), (length,), (N, 1, length)):
            with pytest.raises(ValueError, match=rf"key_padding_mask must have shape \(N, L\) = "
                                                 rf"\({N}, {length}\)"):
                m(x, key_padding_mask=torch.zeros(shape, dtype=torch.bool))
        kpm = torch.zeros(N, length, dtype=torch.bool)
        kpm[1, -5:] = True
        assert m(x, key_padding_mask=kpm).shape == x.shape  # the right shape runs


@pytest.mark.parametrize("make", [
    lambda: fnn.BlockSparseSelfAttention(64, 4, backend="torch"),
    lambda: fnn.LinformerSelfAttention(64, 4, max_seq_len=32, k=4, backend="torch"),
], ids=["block_sparse", "linformer"])
def test_self_attention_init_matches_torch_mha(make):
    """in_proj_weight (3E, E) is xavier-uniform as in torch.nn.MultiheadAttention: within the
    bound sqrt(6 / (E + 3E)), filling it, with the standard deviation bound / sqrt(3) (and torch's
    own MHA's); in_proj_bias and out_proj.bias are 0; out_proj.weight is a default Linear's
    (|w| <= 1 / sqrt(E)). E = 64: 12288 samples give the std to about 1%."""
    torch.manual_seed(0)
    m = make()
    ref = nn.MultiheadAttention(64, 4)
    e = 64
    bound = math.sqrt(6.0 / (e + 3 * e))
    for w in (m.in_proj_weight, ref.in_proj_weight):
        assert w.shape == (3 * e, e)
        assert w.abs().max() <= bound and w.abs().max() > 0.98 * bound
        assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.05
        assert abs(w.mean().item()) < 0.05 * bound
    assert abs(m.in_proj_weight.std().item() / ref.in_proj_weight.std().item() - 1) < 0.05
    assert m.in_proj_bias.shape == (3 * e,) and (m.in_proj_bias == 0).all()
    assert (m.out_proj.bias == 0).all()
    assert m.out_proj.weight.abs().max() <= 1 / math.sqrt(e)
    assert abs(m.out_proj.weight.std().item() / ref.out_proj.weight.std().item() - 1) < 0.1
    assert type(m.out_proj) is type(ref.out_proj)


def test_block_sparse_bad_arguments():
    with pytest.raises(ValueError, match="preset"):
        fnn.BlockSparseSelfAttention(E, H, "diagonal")
    with pytest.raises(ValueError, match="bool tensor"):
        fnn.BlockSparseSelfAttention(E, H, torch.ones(3, 2, 2, dtype=torch.bool))
    with pytest.raises(TypeError):
        fnn.BlockSparseSelfAttention(E, H, "sliding_window", layout_kwargs={"bogus": 1})
    with pytest.raises(ValueError, match="divisible"):
        fnn.BlockSparseSelfAttention(E, 3)


def _linformer_explicit(m, x, kpm):
    """Linformer written out with einsum from the paper's formulas (independent of fastbert)."""
    n, length, _ = x.shape
    h, d = m.num_heads, m.head_dim
    qkv = F.linear(x, m.in_proj_weight, m.in_proj_bias).view(n, length, 3, h, d)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [N, H, L, D]
    if kpm is not None:
        keep = (~kpm)[:, None, :, None].to(x.dtype)
        k, v = k * keep, v * keep
    e = m.proj_k[..., :length]
    f = e if m.proj_v is None else m.proj_v[..., :length]
    eq = "kl,nhld->nhkd" if e.dim() == 2 else "hkl,nhld->nhkd"
    k2, v2 = torch.einsum(eq, e, k), torch.einsum(eq, f, v)
    att = torch.softmax(q @ k2.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (att @ v2).transpose(1, 2).reshape(n, length, h * d)
    return m.out_proj(out)


@pytest.mark.parametrize("share_heads", [True, False], ids=["shared-heads", "per-head"])
@pytest.mark.parametrize("share_kv", [False, True], ids=["EF", "E=F"])
def test_linformer_matches_explicit(share_heads, share_kv):
    torch.manual_seed(0)
    m = fnn.LinformerSelfAttention(E, H, max_seq_len=19, k=6, share_heads=share_heads,
                                   share_kv=share_kv, backend="torch").double()
    assert (m.proj_v is None) == share_kv
    assert m.proj_k.shape == ((6, 19) if share_heads else (H, 6, 19))
    for length in (19, 11):
        x = torch.randn(N, length, E, dtype=torch.float64, requires_grad=True)
        kpm = torch.zeros(N, length, dtype=torch.bool)
        kpm[2, -4:] = True
        out = m(x, key_padding_mask=kpm)
        ref = _linformer_explicit(m, x, kpm)
        assert (out - ref).abs().max() < 1e-10
        g = torch.randn_like(out)
        gx, gp = torch.autograd.grad(out, (x, m.proj_k), g)
        rx, rp = torch.autograd.grad(ref, (x, m.proj_k), g)
        assert (gx - rx).abs().max() < 1e-10 and (gp - rp).abs().max() < 1e-10
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.randn(N, 20, E, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# Triton backend (under the interpreter without a GPU)
# ----------------------------------------------------------------------------------------------
def _triton_vs_reference(module_factory, theirs_factory, inputs, kwargs=None, pick=None):
    """fastbert module with backend="triton" vs the torch twin in float64 (reference) and float32,
    on DEVICE (the GPU when there is one, else the CPU under Triton's interpreter)."""
    ours = module_factory()
    theirs = theirs_factory(ours)
    run_triton(lambda: compare_modules(ours, theirs, inputs, kwargs or {}, pick=pick, device=DEVICE))


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_triton_mha(batch_first):
    """(seq-first: the kernels read q, k, v as strided views of the sequence-first projection)"""
    need_triton("scaled_dot_product_attention")
    torch.manual_seed(0)
    e, h = 32, 2  # head dim 16
    theirs = nn.MultiheadAttention(e, h, batch_first=batch_first)
    x = torch.randn(2, 17, e) if batch_first else torch.randn(17, 2, e)
    kpm = torch.zeros(2, 17, dtype=torch.bool)
    kpm[1, -5:] = True
    _triton_vs_reference(lambda: _SelfAttn(fnn.MultiheadAttention.from_torch(copy.deepcopy(theirs),
                                                                           backend="triton")),
                         lambda o: _SelfAttn(theirs), [x],
                         {"key_padding_mask": kpm, "need_weights": False}, pick=lambda o: [o[0]])


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post", "pre"])
def test_triton_transformer_encoder_layer(norm_first, batch_first):
    need_triton("scaled_dot_product_attention", "add_layer_norm", "bias_gelu", "layer_norm")
    torch.manual_seed(0)
    e, h = 32, 2
    theirs = nn.TransformerEncoderLayer(e, h, dim_feedforward=48, dropout=0.0, activation="gelu",
                                        batch_first=batch_first, norm_first=norm_first)
    x = torch.randn(2, 17, e) if batch_first else torch.randn(17, 2, e)
    kpm = torch.zeros(2, 17, dtype=torch.bool)
    kpm[0, -4:] = True
    _triton_vs_reference(
        lambda: fnn.TransformerEncoderLayer.from_torch(copy.deepcopy(theirs), backend="triton"),
        lambda o: theirs, [x], {"src_key_padding_mask": kpm})


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_seq_first_outputs_are_contiguous_as_torchs(backend, need_weights):
    """Sequence-first MultiheadAttention returns a contiguous (L, N, E) output, as torch's does
    (a .view of it works), whichever path made the context: the torch backend and the
    need_weights path return it batch-first; and LayerNorm's torch backend returns a contiguous
    output for a transposed or permuted input, as F.layer_norm does."""
    if backend == "triton":
        need_triton("scaled_dot_product_attention", "layer_norm")
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(32, 2)  # head dim 16
    ours = fnn.MultiheadAttention.from_torch(copy.deepcopy(theirs), backend=backend)
    x = torch.randn(7, 3, 32)
    out = run_triton(lambda: ours(x, x, x, need_weights=need_weights)[0])
    ref = theirs(x, x, x, need_weights=need_weights)[0]
    assert out.is_contiguous() and out.stride() == ref.stride()
    assert_close(out, ref.double(), ref, name="out")
    norm = fnn.LayerNorm(8, backend=backend)
    for view in (torch.randn(3, 5, 8).transpose(0, 1), torch.randn(8, 5, 3).permute(1, 2, 0)):
        y = run_triton(lambda: norm(view))
        assert y.is_contiguous(), y.stride()
        assert_close(y, F.layer_norm(view.double(), (8,), norm.weight.double(), norm.bias.double()),
                     F.layer_norm(view, (8,), norm.weight, norm.bias), name="layer_norm")


def test_padding_free_encoder_takes_an_empty_batch():
    """N = 0 with a padding mask returns the empty output (the padded path), not an error about
    the packed path's internal cu_seqlens."""
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    enc = fnn.TransformerEncoder(layer, 2, backend="torch")
    for batch_first in (False, True):
        for mod in enc.layers:
            mod.self_attn.batch_first = batch_first
        src = torch.randn(0, 5, 8) if batch_first else torch.randn(5, 0, 8)
        out = enc(src, src_key_padding_mask=torch.zeros(0, 5, dtype=torch.bool))
        assert out.shape == src.shape


def test_merged_bool_masks_allocate_one_full_size_mask():
    """A bool attn_mask (L, S) with a key_padding_mask (N, S) merge into one (N, 1, L, S) keep
    mask: one allocation of that size (an `|` then a `~` at full size made two), same values."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from fastbert.nn.attention import merge_masks
    n, h, lq, lk = 3, 2, 17, 19
    attn = torch.rand(lq, lk) < 0.3
    kpm = torch.rand(n, lk) < 0.3
    big = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.numel() >= n * lq * lk:
                big.append(func.overloadpacket.__name__)
            return out

    with Sizes():
        keep = merge_masks(attn, kpm, n, h, lq, lk, torch.float32)
    assert len(big) == 1, big
    assert torch.equal(keep, ~(attn[None, None] | kpm[:, None, None, :]))


@pytest.mark.parametrize("make", ["mha", "layer-post", "layer-pre", "encoder-packed"])
def test_seq_first_layout_makes_no_activation_copies(make):
    """With torch's default sequence-first layout (batch_first=False) the modules copy no
    activation, forward or backward, as with batch_first=True: the projections and the row ops run
    in the (S, N, E) layout, only the attention kernels see batch-first strided views, and the
    context comes back sequence-first (F.linear of a transposed view, and the LayerNorm of one,
    used to copy it). The padding-free encoder gathers the real tokens straight from the
    sequence-first rows (it copied src transposed first, and returned a transposed view)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    need_triton("scaled_dot_product_attention", "add_layer_norm", "bias_gelu", "layer_norm")
    n, s, e = 2, 33, 32

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in ("clone", "contiguous", "_to_copy", "copy_") and out.numel() >= n * s * e:
                self.seen.append((name, tuple(out.shape)))
            return out

    def copies(batch_first):
        torch.manual_seed(0)
        if make == "mha":
            module = _SelfAttn(fnn.MultiheadAttention(e, 2, batch_first=batch_first, backend="triton"))
            call = lambda x: module(x, need_weights=False)[0]  # noqa: E731
        elif make == "encoder-packed":
            layer = fnn.TransformerEncoderLayer(e, 2, dim_feedforward=48, dropout=0.0,
                                                batch_first=batch_first, backend="triton")
            module = fnn.TransformerEncoder(layer, 2, backend="triton")
            pad = torch.zeros(n, s, dtype=torch.bool)
            pad[1, 20:] = True
            call = lambda x: module(x, src_key_padding_mask=pad)  # noqa: E731
        else:
            module = fnn.TransformerEncoderLayer(e, 2, dim_feedforward=48, dropout=0.0,
                                                 batch_first=batch_first, backend="triton",
                                                 activation="gelu", norm_first=make == "layer-pre")
            call = module
        x = torch.randn((n, s, e) if batch_first else (s, n, e), requires_grad=True)
        with Copies() as mode:
            out = run_triton(lambda: call(x))
            out.backward(torch.randn_like(out))
        assert out.shape == x.shape
        return mode.seen, out.is_contiguous()  # (torch's modules return contiguous outputs)

    assert copies(True) == ([], True)
    assert copies(False) == ([], True)


def test_triton_layer_norm_and_gelu():
    need_triton("layer_norm", "gelu", "geglu")
    theirs = nn.LayerNorm(97)
    _triton_vs_reference(lambda: fnn.LayerNorm.from_torch(copy.deepcopy(theirs), backend="triton"),
                         lambda o: theirs, [torch.randn(3, 97)])
    _triton_vs_reference(lambda: fnn.GELU("tanh", backend="triton"), lambda o: nn.GELU("tanh"),
                         [torch.randn(5, 17)])
    _triton_vs_reference(lambda: fnn.GEGLU(backend="triton"), lambda o: _TorchGEGLU("none"),
                         [torch.randn(5, 34)])


def test_triton_block_sparse_attention():
    need_triton("block_sparse_attention")
    torch.manual_seed(0)
    e, h, bs, length = 32, 2, 16, 40
    ours = fnn.BlockSparseSelfAttention(e, h, "sliding_window", block_size=bs, backend="triton")
    keep = reference.layout_to_mask(fastbert.sparsity.sliding_window(length, bs), bs, length, length)[0]
    theirs = _MaskedMHA(_mha_twin(ours), ~keep)
    x = torch.randn(2, length, e)
    run_triton(lambda: compare_modules(_SparseAsMHA(ours), theirs.to(DEVICE), [x],
                                       check_param_grads=False, device=DEVICE))


@pytest.mark.parametrize("layout", ["preset", "tensor"])
def test_triton_block_sparse_trains_after_an_inference_mode_pass(layout):
    """A first forward under torch.inference_mode (a validation pass before training, as
    Lightning's sanity check runs) caches the module's layout: it must still be a normal tensor,
    which the training step then saves for backward."""
    need_triton("block_sparse_attention")
    torch.manual_seed(0)
    lay = "sliding_window" if layout == "preset" else fastbert.sparsity.sliding_window(64, 16)
    m = fnn.BlockSparseSelfAttention(32, 2, lay, block_size=16, backend="triton").to(DEVICE).eval()

    def run():
        with torch.inference_mode():
            m(torch.randn(2, 40, 32, device=DEVICE))
        m.train()
        x = torch.randn(2, 40, 32, device=DEVICE, requires_grad=True)
        m(x).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
    run_triton(run)


def test_triton_linformer_attention():
    need_triton("linformer_attention")
    torch.manual_seed(0)
    m = fnn.LinformerSelfAttention(32, 2, max_seq_len=24, k=16, backend="triton").to(DEVICE)
    x = torch.randn(2, 24, 32, device=DEVICE)
    kpm = torch.zeros(2, 24, dtype=torch.bool, device=DEVICE)
    kpm[1, -6:] = True
    out = run_triton(lambda: m(x, key_padding_mask=kpm))
    ref = _linformer_explicit(copy.deepcopy(m).double(), x.double(), kpm)
    low = _linformer_explicit(m, x, kpm)
    assert_close(out, ref, low, name="linformer output")


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------
def test_compile_transformer_encoder_layer_fullgraph():
    """One fastbert module under torch.compile(fullgraph=True): forward and backward match eager."""
    torch.manual_seed(0)
    layer = fnn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True,
                                        activation="gelu", backend="torch")
    x = torch.randn(N, L, E, requires_grad=True)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1, -2:] = True
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x, src_key_padding_mask=kpm)
    ref = layer(x, src_key_padding_mask=kpm)
    assert_close(out, ref.double(), atol=1e-5)
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, layer.linear1.weight), g)
    rx, rw = torch.autograd.grad(ref, (x, layer.linear1.weight), g)
    assert_close(gx, rx.double(), atol=1e-5)
    assert_close(gw, rw.double(), atol=1e-5)


@pytest.mark.parametrize("layout", ["sliding_window", "tensor"])
def test_compile_block_sparse_module_fullgraph(layout):
    """A layout tensor (the module's buffer, sliced per length) compiles as one graph, as a preset
    does: forward and backward match eager."""
    torch.manual_seed(0)
    lay = torch.rand(1, 8, 8) < 0.6 if layout == "tensor" else layout
    m = fnn.BlockSparseSelfAttention(E, H, lay, block_size=4, backend="torch")
    x = torch.randn(N, 13, E, requires_grad=True)
    kpm = torch.zeros(N, 13, dtype=torch.bool)
    kpm[1, -3:] = True
    out = torch.compile(m, fullgraph=True)(x, key_padding_mask=kpm)
    ref = m(x, key_padding_mask=kpm)
    assert_close(out, ref.double(), atol=1e-5)
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, m.in_proj_weight), g)
    rx, rw = torch.autograd.grad(ref, (x, m.in_proj_weight), g)
    assert_close(gx, rx.double(), atol=1e-5)
    assert_close(gw, rw.double(), atol=1e-5)


@pytest.mark.parametrize("layout", ["sliding_window", "longformer", "tensor"])
def test_compile_block_sparse_module_dynamic_lengths_compile_once(layout):
    """torch.compile(dynamic=True) of the module over inputs of many lengths (many block counts):
    one frame. A preset is built in the graph, not through the module's layout cache, whose size
    and keys Dynamo guarded on (a recompile per length, eager after 8 of them)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    lay = torch.rand(1, 12, 12) < 0.6 if layout == "tensor" else layout
    m = fnn.BlockSparseSelfAttention(E, H, lay, block_size=4, backend="torch").eval()
    counter = CompileCounter()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(m, backend=counter, dynamic=True)
        for length in (5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45):
            x = torch.randn(N, length, E)
            assert_close(compiled(x), m(x).double(), atol=1e-5)
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1


@pytest.mark.parametrize("layout, kwargs", [("sliding_window", {}), ("fixed", {"stride": 2}),
                                            ("longformer", {"global_blocks": [0, 1]})])
def test_export_block_sparse_module_with_a_dynamic_length(layout, kwargs):
    """torch.export with a dynamic sequence length: the preset's layout is built in the graph
    from the symbolic length (the presets' checks once wanted ints and failed the export), and the
    exported module equals eager at other lengths. A global block beyond a shorter input's blocks,
    which eager leaves out, fails the exported program's run-time check instead."""
    m = fnn.BlockSparseSelfAttention(E, H, layout, block_size=4, layout_kwargs=kwargs,
                                     backend="torch").eval()
    blocks = torch.export.Dim("blocks", min=2, max=64)
    program = torch.export.export(m, (torch.randn(N, 24, E),), dynamic_shapes=({1: 4 * blocks},))
    for length in (8, 20, 52):
        x = torch.randn(N, length, E)
        torch.testing.assert_close(program.module()(x), m(x))
    if layout == "longformer":
        short = fnn.BlockSparseSelfAttention(E, H, layout, block_size=4,
                                             layout_kwargs={"global_blocks": [0, 3]},
                                             backend="torch").eval()
        program = torch.export.export(short, (torch.randn(N, 24, E),),
                                      dynamic_shapes=({1: 4 * blocks},))
        x = torch.randn(N, 16, E)
        torch.testing.assert_close(program.module()(x), short(x))
        short(torch.randn(N, 12, E))  # block 3 is past the input's end: left out
        with pytest.raises((RuntimeError, AssertionError)):  # torch's message: "Guard failed"
            program.module()(torch.randn(N, 12, E))


def test_export_linformer_module_up_to_max_seq_len():
    """torch.export of LinformerSelfAttention with a dynamic length up to max_seq_len: the
    projections' first columns are gathered, not viewed (a view is contiguous only at max_seq_len,
    and the trace guarded on it: the export failed); equal to eager at every length, the full
    length included, and its projections get the same gradients in training mode."""
    m = fnn.LinformerSelfAttention(E, H, max_seq_len=24, k=8, backend="torch").eval()
    program = torch.export.export(m, (torch.randn(N, 10, E),),
                                  dynamic_shapes=({1: torch.export.Dim("length", min=2, max=24)},))
    for length in (2, 13, 23, 24):
        x = torch.randn(N, length, E)
        torch.testing.assert_close(program.module()(x), m(x))
    compiled = torch.compile(m, backend="aot_eager", dynamic=True, fullgraph=True)
    x = torch.randn(N, 17, E)
    g = torch.randn(N, 17, E)
    got = torch.autograd.grad(compiled(x), m.proj_k, g)[0]
    want = torch.autograd.grad(m(x), m.proj_k, g)[0]
    assert (got[..., 17:] == 0).all()
    torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------------------------
# GPU, half precision (compiled kernels, default backend)
# ----------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post", "pre"])
def test_cuda_transformer_encoder_layer_half(norm_first, dtype):
    torch.manual_seed(0)
    e, h = 256, 4  # head dim 64
    theirs = nn.TransformerEncoderLayer(e, h, dim_feedforward=1024, dropout=0.0, activation="gelu",
                                        batch_first=True, norm_first=norm_first)
    ours = fnn.TransformerEncoderLayer.from_torch(copy.deepcopy(theirs))
    x = torch.randn(4, 130, e)
    kpm = torch.zeros(4, 130, dtype=torch.bool)
    kpm[1, 97:] = True
    kpm[3, 17:] = True
    compare_modules(ours, theirs, [x], {"src_key_padding_mask": kpm}, dtype=dtype, device="cuda")


@pytest.mark.cuda
def test_cuda_mha_half_cross_attention():
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(128, 2, kdim=96, vdim=80, batch_first=True)
    ours = fnn.MultiheadAttention.from_torch(copy.deepcopy(theirs))
    q, k, v = torch.randn(3, 97, 128), torch.randn(3, 130, 96), torch.randn(3, 130, 80)
    kpm = torch.zeros(3, 130, dtype=torch.bool)
    kpm[0, 100:] = True
    compare_modules(ours, theirs, [q, k, v], {"key_padding_mask": kpm, "need_weights": False},
                    dtype=torch.float16, device="cuda", pick=lambda o: [o[0]])


def test_encoder_float_mask_with_bias_below_diagonal_is_not_taken_as_causal():
    """-inf above the diagonal and a nonzero bias below it is not the causal mask: the packed
    (causal-only) path must not drop the bias (a looser causal check survived a mutation run)."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    ref = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    enc = fnn.TransformerEncoder.from_torch(ref, backend="torch").eval()
    x = torch.randn(2, 5, 16)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(5) + torch.tril(torch.randn(5, 5) * 3)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1, 3:] = True
    fkpm = torch.zeros(2, 5).masked_fill(kpm, float("-inf"))
    out = enc(x, mask=mask, src_key_padding_mask=fkpm)
    want = ref(x, mask=mask, src_key_padding_mask=fkpm)  # (with grad: torch's fast path NaNs here)
    real = ~kpm
    torch.testing.assert_close(out[real], want[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("is_causal", [False, None], ids=["is_causal=False", "is_causal=None"])
@pytest.mark.parametrize("kind", ["bool-band", "float-band", "float-band-bias", "bool-anticausal"])
def test_encoder_non_causal_square_mask_with_padding_is_not_taken_as_causal(kind, is_causal):
    """A non-causal (S, S) mask (a sliding window plus the first token, bool or float, or the
    transposed causal mask) with a key padding mask and is_causal False / None: the padding-free
    encoder must apply the mask as given (padded path), not the causal one (a mutant taking any
    square mask as hinted survived). Eval mode, float64, against torch's encoder on the real
    tokens."""
    torch.manual_seed(0)
    s = 8
    ref = _torch_encoder(layers=2).double().eval()
    enc = fnn.TransformerEncoder.from_torch(copy.deepcopy(ref), backend="torch").eval()
    i = torch.arange(s)
    if kind == "bool-anticausal":
        blocked = torch.ones(s, s, dtype=torch.bool).tril(-1)  # True = not attended
    else:
        blocked = (i[:, None] - i[None, :]).abs() > 2  # outside a band of +-2
    blocked[:, 0] = False  # every query sees token 0 (real in every sequence): no fully masked row
    real = torch.ones(N, s, dtype=torch.bool)
    real[1, 5:] = False
    real[2, 3:] = False
    mask, kpm = blocked, ~real
    if kind.startswith("float"):  # (a float padding mask with it: torch warns on mixed types)
        mask = torch.zeros(s, s, dtype=torch.float64).masked_fill(blocked, float("-inf"))
        if kind.endswith("bias"):
            mask = mask + torch.randn(s, s, dtype=torch.float64)
        kpm = torch.zeros(N, s, dtype=torch.float64).masked_fill(~real, float("-inf"))
    x = torch.randn(N, s, E, dtype=torch.float64)
    out = enc(x, mask=mask, src_key_padding_mask=kpm, is_causal=is_causal)
    want = ref(x, mask=mask, src_key_padding_mask=kpm, is_causal=is_causal)
    assert torch.isfinite(want[real]).all()
    assert (out[real] - want[real]).abs().max() < 1e-10
