"""fastbert.models.BertEncoder: the padding-free encoder against the HuggingFace model it is built
from (BERT, RoBERTa, ELECTRA, DistilBERT, ALBERT, the pre-LN XLM-R-XL and RoBERTa-PreLayerNorm,
MPNet with its relative-position bias; small random configs), on the real tokens of padded
batches, in eval and train mode, with gradients; float32 checked against the HuggingFace model in float64 with
PyTorch's float32 error as the yardstick."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastbert  # noqa: E402
from fastbert import backends  # noqa: E402
from fastbert.models import BertEncoder  # noqa: E402
from fastbert.nn._utils import dropout_rate  # noqa: E402
from fastbert.optimize import optimize  # noqa: E402
from fastbert.testing import ATOL_FLOOR, DEVICE, assert_close, assert_compiled_encoder_matches  # noqa: E402

VOCAB = 99


def _model(family="bert", model_cls=None, dropout=0.0, **overrides):
    if family == "distilbert":
        kw = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=overrides.pop("num_attention_heads", 4),
                  hidden_dim=64, max_position_embeddings=40, dropout=dropout, attention_dropout=dropout,
                  attn_implementation="eager")
        kw.update(overrides)
        return getattr(transformers, model_cls or "DistilBertModel")(transformers.DistilBertConfig(**kw))
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=dropout,
              attention_probs_dropout_prob=dropout, attn_implementation="eager")
    if family in ("electra", "albert"):
        kw["embedding_size"] = 16  # exercises the embeddings' projection
    kw.update(overrides)
    config = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig,
              "electra": transformers.ElectraConfig, "xlm_roberta": transformers.XLMRobertaConfig,
              "ernie": transformers.ErnieConfig, "albert": transformers.AlbertConfig,
              "xlm_roberta_xl": transformers.XLMRobertaXLConfig,
              "roberta_prelayernorm": transformers.RobertaPreLayerNormConfig,
              "mpnet": transformers.MPNetConfig}[family](**kw)
    name = model_cls or {"bert": "BertModel", "roberta": "RobertaModel", "electra": "ElectraModel",
                         "xlm_roberta": "XLMRobertaModel", "ernie": "ErnieModel",
                         "albert": "AlbertModel", "xlm_roberta_xl": "XLMRobertaXLModel",
                         "roberta_prelayernorm": "RobertaPreLayerNormModel", "mpnet": "MPNetModel"}[family]
    return getattr(transformers, name)(config)


def _batch(lengths, seqlen, holes=False, device="cpu"):
    ids = torch.randint(3, VOCAB, (len(lengths), seqlen), device=device)
    mask = torch.zeros(len(lengths), seqlen, dtype=torch.long, device=device)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    if holes:  # real tokens need not be contiguous
        mask[0, 1] = 0
        mask[0, seqlen - 1] = 1
    return ids, mask


def _check(enc, hf, ids, mask):
    """Eval output of ``enc`` vs ``hf`` (float32) and a float64 copy of ``hf``, on real tokens."""
    hf64 = copy.deepcopy(hf).double()
    real = mask.bool()
    for m in (enc, hf, hf64):
        m.eval()
    with torch.no_grad():
        out = enc(ids, attention_mask=mask)
        low = hf(ids, attention_mask=mask).last_hidden_state
        ref = hf64(ids, attention_mask=mask).last_hidden_state
    assert out.shape == low.shape
    assert_close(out[real], ref[real], low[real], name="last_hidden_state (real tokens)")
    assert (out[~real] == 0).all(), "padding positions must be 0"


def _need_triton(*ops):
    missing = [op for op in ops if "triton" not in backends.implementations(op)]
    if missing:
        pytest.skip(f"no Triton registration yet for {missing}")
    reasons = backends.backend_reasons("triton", torch.device(DEVICE))
    if reasons:
        pytest.skip("Triton backend unavailable: " + "; ".join(reasons))


TRITON_OPS = ("varlen_attention", "add_layer_norm", "bias_gelu")


@pytest.mark.parametrize("family", ["bert", "roberta", "electra", "xlm_roberta", "ernie", "distilbert",
                                    "albert", "xlm_roberta_xl", "roberta_prelayernorm", "mpnet"])
@pytest.mark.parametrize("lengths", [(9, 4, 1), (7, 7), (1,)], ids=["9-4-1", "full", "B1"])
def test_encoder_matches_hf_eval(family, lengths):
    torch.manual_seed(0)
    hf = _model(family).eval()
    enc = BertEncoder.from_hf(hf, backend="torch")
    ids, mask = _batch(lengths, max(lengths) + 2)
    _check(enc, hf, ids, mask)


def test_encoder_albert_layer_groups():
    """ALBERT with two groups of two inner layers over four layers: the shared layers in
    transformers' order."""
    torch.manual_seed(0)
    hf = _model("albert", num_hidden_layers=4, num_hidden_groups=2, inner_group_num=2).eval()
    enc = BertEncoder.from_hf(hf, backend="torch")
    assert len(enc.layers) == 8 and len({id(layer) for layer in enc.layers}) == 4
    ids, mask = _batch((9, 4, 1), 11)
    _check(enc, hf, ids, mask)


def test_encoder_mpnet_padding_anywhere_but_inside():
    """MPNet's relative positions are those of the padded row: left padding and right padding pack
    exactly (the bias is shift-invariant); a gap inside a row has no packed equivalent and is
    refused with ValueError."""
    torch.manual_seed(0)
    hf = _model("mpnet").eval()
    enc = BertEncoder.from_hf(hf, backend="torch")
    assert enc.relative_attention_bias is hf.encoder.relative_attention_bias
    ids, mask = _batch((9, 4, 1), 11)
    mask[1] = 0
    mask[1, 5:9] = 1  # padding on both sides
    _check(enc, hf, ids, mask)
    mask[0, 3] = 0  # a gap
    with pytest.raises(ValueError, match="gap"):
        enc(ids, attention_mask=mask)


def test_encoder_under_inference_mode(monkeypatch):
    """torch.inference_mode (whose tensors have no version counter) gives the no_grad output; the
    cu_seqlens the encoder builds is checked on the host once per forward, not once per layer."""
    from fastbert import _validation
    torch.manual_seed(0)
    hf = _model().eval()
    enc = BertEncoder.from_hf(hf, backend="torch")
    ids, mask = _batch((9, 4, 1), 11)
    with torch.no_grad():
        expected = enc(ids, attention_mask=mask)
    fresh_checks = []
    real_put = _validation._cu_cache_put
    monkeypatch.setattr(_validation, "_cu_cache_put",
                        lambda cu, *a: (fresh_checks.append(cu), real_put(cu, *a)))
    with torch.inference_mode():
        out = enc(ids, attention_mask=mask)
    assert out.is_inference()
    assert torch.equal(out, expected)
    assert len(hf.encoder.layer) > 1 and len(fresh_checks) == 1


def test_encoder_non_contiguous_and_empty_sequences():
    torch.manual_seed(0)
    hf = _model().eval()
    enc = BertEncoder.from_hf(hf, backend="torch")
    ids, mask = _batch((5, 3, 6), 8, holes=True)
    _check(enc, hf, ids, mask)
    ids, mask = _batch((5, 0, 6), 8)  # a sequence with no real token: all zeros, no NaN
    with torch.no_grad():
        out = enc(ids, attention_mask=mask)
    assert torch.isfinite(out).all() and (out[1] == 0).all()


@pytest.mark.parametrize("family,backend", [("bert", "torch"), ("roberta", "torch"), ("distilbert", "torch"),
                                            ("albert", "torch"), ("xlm_roberta_xl", "torch"),
                                            ("roberta_prelayernorm", "torch"), ("mpnet", "torch"),
                                            ("bert", "triton"), ("roberta_prelayernorm", "triton"),
                                            ("mpnet", "triton")])
def test_encoder_training_gradients_match_hf(family, backend):
    """Train mode, dropout 0: the encoder's gradients equal the HuggingFace model's (the fp64 copy
    is the reference, the fp32 HuggingFace model PyTorch's own error)."""
    device = "cpu"
    if backend == "triton":
        _need_triton(*TRITON_OPS)
        device = DEVICE
    torch.manual_seed(0)
    hf = _model(family, num_attention_heads=2).to(device)  # head dim 16
    hf_ref = copy.deepcopy(hf)
    hf64 = copy.deepcopy(hf).double()
    enc = BertEncoder.from_hf(hf, backend=backend)
    assert enc.training
    ids, mask = _batch((9, 5, 2), 11, device=device)
    real = mask.bool()
    try:
        out = enc(ids, attention_mask=mask)
    except backends.BackendError as e:
        pytest.skip(f"the Triton backend declines: {e}")
    low = hf_ref(ids, attention_mask=mask).last_hidden_state
    ref = hf64(ids, attention_mask=mask).last_hidden_state
    assert_close(out[real], ref[real], low[real], name="train output")
    g = torch.randn(ref.shape, dtype=torch.float64, device=device) * real[..., None]
    for o in (out, low, ref):
        o.backward(g.to(o.dtype))
    p_enc, p_low, p_ref = (dict(m.named_parameters()) for m in (hf, hf_ref, hf64))
    checked = 0
    for name, p in p_enc.items():
        if p_ref[name].grad is None:
            continue
        if name.startswith("pooler"):  # not part of the encoder's output
            assert p.grad is None
            continue
        assert p.grad is not None, f"{name}: no gradient"
        # a sum over every token (a token-type row, a LayerNorm's weight) has an fp32 rounding error
        # that grows with its magnitude: the floor is relative there
        atol = ATOL_FLOOR[torch.float32] * max(1.0, float(p_ref[name].grad.abs().max()))
        assert_close(p.grad, p_ref[name].grad, p_low[name].grad, atol=atol, name=f"grad {name}")
        checked += 1
    assert checked >= (20 if family == "albert" else 30)  # ALBERT's layers share one set of weights


def test_encoder_shares_parameters_and_optimizer_updates_both():
    hf = _model()
    enc = BertEncoder.from_hf(hf)
    hf_params = {id(p) for p in hf.parameters()}
    assert all(id(p) in hf_params for p in enc.parameters())
    assert enc.pooler is hf.pooler and enc.embeddings is hf.embeddings
    assert len(enc.layers) == 2
    opt = torch.optim.SGD(hf.parameters(), lr=0.1)
    ids, mask = _batch((6, 3), 6)
    w = hf.encoder.layer[0].intermediate.dense.weight.detach().clone()
    out = enc(ids, attention_mask=mask)
    # a random projection: mean(out ** 2) of a LayerNorm output with unit weight and zero bias is
    # ~1 whatever the input, so its gradients (~1e-10) left the weights unchanged for some draws
    (out * torch.randn_like(out)).sum().backward()
    opt.step()
    assert not torch.equal(hf.encoder.layer[0].intermediate.dense.weight, w)


def test_encoder_dropout_in_train_mode():
    hf = _model(dropout=0.2)
    enc = BertEncoder.from_hf(hf, backend="torch")
    ids, mask = _batch((6, 3), 6)
    enc.eval()
    with torch.no_grad():
        ev = enc(ids, attention_mask=mask)
    enc.train()
    torch.manual_seed(11)
    t1 = enc(ids, attention_mask=mask)
    torch.manual_seed(11)
    t2 = enc(ids, attention_mask=mask)
    real = mask.bool()
    assert torch.equal(t1, t2), "dropout must be reproducible under torch.manual_seed"
    assert (t1 - ev)[real].abs().max() > 1e-3, "dropout had no effect in train mode"


def test_encoder_forward_packed_and_task_model():
    torch.manual_seed(0)
    hf = _model(model_cls="BertForMaskedLM").eval()
    enc = BertEncoder.from_hf(hf, backend="torch")  # a task model: its base model's encoder
    ids, mask = _batch((7, 2, 5), 7)
    with torch.no_grad():
        out = enc(ids, attention_mask=mask)
        emb = hf.bert.embeddings(input_ids=ids)
        packed, indices, cu, max_len = fastbert.unpad_input(emb, mask)
        packed_out = enc.forward_packed(packed, cu, max_len)
        ref = hf.bert(ids, attention_mask=mask).last_hidden_state
    assert torch.equal(fastbert.pad_input(packed_out, indices, 3, 7), out)
    assert_close(out[mask.bool()], ref[mask.bool()].double(), ref[mask.bool()], atol=1e-5)
    with torch.no_grad():  # inputs_embeds and no mask (all real)
        a = enc(inputs_embeds=hf.bert.embeddings.word_embeddings(ids))
        b = hf.bert(inputs_embeds=hf.bert.embeddings.word_embeddings(ids)).last_hidden_state
    assert_close(a, b.double(), b, atol=1e-5)


def test_encoder_after_optimize():
    torch.manual_seed(0)
    hf = _model().eval()
    reference = copy.deepcopy(hf)
    optimize(hf)
    enc = BertEncoder.from_hf(hf, backend="torch")
    ids, mask = _batch((6, 4), 6)
    with torch.no_grad():
        a = reference(ids, attention_mask=mask).last_hidden_state
        b = enc(ids, attention_mask=mask)
    real = mask.bool()
    assert_close(b[real], a[real].double(), a[real], atol=1e-5)


def test_encoder_refusals():
    with pytest.raises(ValueError, match="decoder"):
        BertEncoder.from_hf(_model(is_decoder=True))
    with pytest.raises(ValueError, match="BERT-style"):
        BertEncoder.from_hf(torch.nn.Linear(2, 2))
    enc = BertEncoder.from_hf(_model())
    with pytest.raises(ValueError, match="exactly one"):
        enc()
    with pytest.raises(ValueError, match="backend"):
        BertEncoder.from_hf(_model(), backend="tpu")


def test_encoder_triton_eval():
    _need_triton(*TRITON_OPS)
    torch.manual_seed(0)
    hf = _model(num_attention_heads=2).to(DEVICE)  # head dim 16
    enc = BertEncoder.from_hf(hf, backend="triton")
    ids, mask = _batch((9, 4, 1), 9, device=DEVICE)
    try:
        _check(enc, hf, ids, mask)
    except backends.BackendError as e:
        pytest.skip(f"the Triton backend declines: {e}")


@pytest.mark.parametrize("family", ["bert", "roberta_prelayernorm", "mpnet"],
                         ids=["post_ln", "pre_ln", "mpnet"])
def test_encoder_compiles_as_one_graph_with_its_unpadding(family):
    """torch.compile(fullgraph=True) of the whole encoder, unpadding included: with Dynamo told to
    capture data-dependent shapes (the packed length and max_seqlen come from the mask), the
    packed length stays a symbol through every op's checks (MPNet's (1, H, max_seqlen,
    max_seqlen) bias included: its broadcast check once failed the trace on max_seqlen == 1); a
    second batch with other lengths runs too."""
    _need_triton(*TRITON_OPS)
    torch.manual_seed(0)
    hf = _model(family, num_attention_heads=2).to(DEVICE).eval()  # head dim 16
    enc = BertEncoder.from_hf(hf, backend="triton")
    # MPNet: Dynamo traces one graph; Inductor then fails inside transformers' relative-position
    # bucketing with the bias length known only at run time (torch 2.14.1, CPU): traced only
    backend = "aot_eager" if family == "mpnet" else "inductor"
    assert_compiled_encoder_matches(enc, [_batch(lengths, 9, device=DEVICE)
                                          for lengths in ((9, 4, 1), (7, 9, 2))], backend=backend)


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["bert", "xlm_roberta_xl"], ids=["post_ln", "pre_ln"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_encoder_half(dtype, family):
    """The GPU path (default backend, compiled kernels): outputs and gradients within 2x PyTorch's
    own half-precision error, BERT and the pre-LN XLM-R-XL with head dim 64 and awkward lengths."""
    torch.manual_seed(0)
    hf = _model(family, hidden_size=256, num_attention_heads=4, intermediate_size=1024,
                max_position_embeddings=160).to("cuda")
    hf64 = copy.deepcopy(hf).double()
    hf = hf.to(dtype)
    hf_low = copy.deepcopy(hf)
    enc = BertEncoder.from_hf(hf)
    ids, mask = _batch((130, 97, 17, 1), 130, device="cuda")
    real = mask.bool()
    out = enc(ids, attention_mask=mask)
    low = hf_low(ids, attention_mask=mask).last_hidden_state
    ref = hf64(ids, attention_mask=mask).last_hidden_state
    assert out.dtype == dtype
    assert_close(out[real], ref[real], low[real], name="output")
    g = torch.randn(ref.shape, dtype=torch.float64, device="cuda") * real[..., None]
    for o in (out, low, ref):
        o.backward(g.to(o.dtype))
    p_enc, p_low, p_ref = (dict(m.named_parameters()) for m in (hf, hf_low, hf64))
    for name, p in p_enc.items():
        if p_ref[name].grad is None or name.startswith("pooler"):
            continue
        assert_close(p.grad, p_ref[name].grad, p_low[name].grad, name=f"grad {name}")


# ----------------------------------------------------------------------------------------------
# The fused Q/K/V weight cache of BertLayer
# ----------------------------------------------------------------------------------------------
def _count_qkv_cats(monkeypatch, enc):
    """Count torch.cat calls that fuse a layer's Q/K/V weights (other cats are not counted)."""
    weights = {id(layer.query.weight) for layer in enc.layers}
    calls = []
    real_cat = torch.cat

    def cat(tensors, *args, **kwargs):
        if isinstance(tensors, (list, tuple)) and tensors and id(tensors[0]) in weights:
            calls.append(tensors[0])
        return real_cat(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "cat", cat)
    return calls


def _fused(layer):
    """The layer's fused (weight, bias), asked for the way an eval forward does (no grad)."""
    with torch.no_grad():
        return layer._fused_qkv()


def _hf_out(hf, ids, mask):
    with torch.no_grad():
        return hf(ids, attention_mask=mask).last_hidden_state


def test_qkv_cache_reused_without_grad_and_equal_to_hf(monkeypatch):
    torch.manual_seed(0)
    hf = _model().eval()
    enc = BertEncoder.from_hf(hf, backend="torch").eval()
    keys = list(enc.state_dict())
    ids, mask = _batch((6, 3), 6)
    cats = _count_qkv_cats(monkeypatch, enc)
    with torch.no_grad():
        first = enc(ids, attention_mask=mask)
    assert len(cats) == 2  # one fused weight per layer
    fused = [_fused(layer)[0] for layer in enc.layers]
    with torch.no_grad():
        second = enc(ids, attention_mask=mask)
    packed, _, cu, max_len = fastbert.unpad_input(torch.randn(2, 6, 32), mask)
    with torch.no_grad():
        mid = enc.layers[0](packed, cu, max_len)
    with torch.inference_mode():  # a layer under inference_mode (cu_seqlens made outside it)
        third = enc.layers[0](packed, cu, max_len)
    assert len(cats) == 2, "the cached fused weights must be reused under no_grad / inference_mode"
    assert all(_fused(layer)[0] is w for layer, w in zip(enc.layers, fused))
    assert torch.equal(first, second) and torch.equal(mid, third)
    assert fused[0].shape == (3 * 32, 32) and _fused(enc.layers[0])[1].shape == (3 * 32,)
    real = mask.bool()
    ref = _hf_out(copy.deepcopy(hf).double(), ids, mask)
    assert_close(first[real], ref[real], _hf_out(hf, ids, mask)[real], name="cached eval output")
    assert list(enc.state_dict()) == keys, "the cache must not enter the state_dict"
    assert all("qkv" not in name for name, _ in enc.named_buffers())


def test_qkv_cache_invalidated_by_parameter_changes(monkeypatch):
    torch.manual_seed(0)
    hf = _model().eval()
    enc = BertEncoder.from_hf(hf, backend="torch").eval()
    layer = enc.layers[0]
    ids, mask = _batch((5, 4), 5)
    real = mask.bool()
    cats = _count_qkv_cats(monkeypatch, enc)

    def run():
        with torch.no_grad():
            out = enc(ids, attention_mask=mask)
        low = _hf_out(hf, ids, mask)
        ref = _hf_out(copy.deepcopy(hf).double(), ids, mask)
        assert_close(out[real], ref[real], low[real], name="output after a parameter change")
        return out

    before = run()
    assert len(cats) == 2
    w0 = _fused(layer)[0]
    with torch.no_grad():  # an in-place update (what an optimizer step does)
        layer.query.weight.add_(1)
    after = run()
    assert len(cats) == 3 and not torch.equal(before, after)  # layer 0 rebuilt, layer 1 reused
    assert _fused(layer)[0] is not w0
    assert torch.equal(_fused(layer)[0][:32], layer.query.weight)
    with torch.no_grad():
        layer.value.bias.mul_(2)     # a bias alone
    run()
    assert len(cats) == 4
    assert torch.equal(_fused(layer)[1][64:], layer.value.bias)
    enc.load_state_dict({k: v + 0.01 for k, v in enc.state_dict().items()})
    run()
    assert len(cats) == 6
    enc.double()                     # a dtype change (the HuggingFace model shares the modules)
    assert _fused(layer)[0].dtype == torch.float64 and len(cats) == 7
    run()
    assert len(cats) == 8
    new = torch.nn.Parameter(layer.key.weight.detach().clone() * 3)
    layer.key.weight = new           # a replaced parameter (shared with the HuggingFace model)
    run()
    assert len(cats) == 9 and torch.equal(_fused(layer)[0][32:64], new)
    with torch.no_grad():
        layer.key.weight.data.zero_()  # .data bypasses the version counter: clear by hand
    layer.clear_qkv_cache()
    run()
    assert len(cats) == 10 and (_fused(layer)[0][32:64] == 0).all()


def test_qkv_cache_not_used_while_gradients_flow(monkeypatch):
    torch.manual_seed(0)
    hf = _model()
    enc = BertEncoder.from_hf(hf, backend="torch")
    ids, mask = _batch((4, 2), 4)
    cats = _count_qkv_cats(monkeypatch, enc)
    for _ in range(2):
        enc(ids, attention_mask=mask).sum().backward()
    assert len(cats) == 4, "training with grad concatenates on every forward"
    assert "_qkv_cache" not in enc.layers[0].__dict__
    for layer in enc.layers:
        assert layer.query.weight.grad is not None and layer.value.bias.grad is not None
    # frozen Q/K/V with grad on: the cache serves, the input still gets its gradient
    for layer in enc.layers:
        for lin in (layer.query, layer.key, layer.value):
            lin.requires_grad_(False)
    x = torch.randn(7, 32, requires_grad=True)
    cu = torch.tensor([0, 4, 7], dtype=torch.int32)
    with torch.inference_mode():
        enc.layers[0](x.detach(), cu, 4)  # builds the cache under inference_mode
    n = len(cats)
    enc.layers[0](x, cu, 4).sum().backward()
    assert len(cats) == n and x.grad is not None and torch.isfinite(x.grad).all()


def test_qkv_cache_deepcopy_and_pickle():
    import io

    torch.manual_seed(0)
    hf = _model().eval()
    enc = BertEncoder.from_hf(hf, backend="torch").eval()
    ids, mask = _batch((5, 2), 5)
    with torch.no_grad():
        out = enc(ids, attention_mask=mask)
    assert "_qkv_cache" in enc.layers[0].__dict__
    twin = copy.deepcopy(enc)
    assert "_qkv_cache" not in twin.layers[0].__dict__
    with torch.no_grad():
        assert torch.equal(twin(ids, attention_mask=mask), out)
        twin.layers[0].query.weight.add_(1)  # the copy's cache follows the copy's parameters
        assert not torch.equal(twin(ids, attention_mask=mask), out)
        assert torch.equal(enc(ids, attention_mask=mask), out)
    assert _fused(twin.layers[0])[0] is not _fused(enc.layers[0])[0]
    buf = io.BytesIO()
    torch.save(enc, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask), out)
    assert list(loaded.state_dict()) == list(enc.state_dict())


@pytest.mark.parametrize("site", ["attention_dropout", "hidden_dropout", "output_dropout"])
def test_encoder_each_dropout_site_acts_in_train_mode(site):
    """Only one dropout site on (embeddings' dropout off): train output must differ from eval
    (the one train-mode test passed on the embeddings' dropout alone: attention or hidden
    dropout set to 0 survived a mutation run)."""
    torch.manual_seed(0)
    hf = _model(dropout=0.0)
    enc = BertEncoder.from_hf(hf, backend="torch")
    enc.embeddings.dropout.p = 0.0
    for layer in enc.layers:
        getattr(layer, site).p = 0.5
    ids, mask = _batch((6, 3), 6)
    real = mask.bool()
    enc.eval()
    with torch.no_grad():
        ev = enc(ids, attention_mask=mask)
    enc.train()
    torch.manual_seed(1)
    with torch.no_grad():
        tr = enc(ids, attention_mask=mask)
    assert (tr - ev)[real].abs().max() > 1e-3, f"{site} had no effect in train mode"


# ----------------------------------------------------------------------------------------------
# Gaps found by a mutation run: each test fails on a mutant that every other test let through
# ----------------------------------------------------------------------------------------------
def _randomize_biases(model):
    """Nonzero biases and LayerNorm shifts (HuggingFace initializes them to 0): a Dropout applied
    to a bias alone (attention probabilities all dropped) then changes the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)


@pytest.mark.parametrize("family", ["bert", "distilbert", "albert", "xlm_roberta_xl",
                                    "roberta_prelayernorm", "mpnet"])
def test_encoder_each_dropout_of_the_original_alone_at_p1_matches_hf(family):
    """Each Dropout module of the HuggingFace model alone at p = 1 (every other at 0), train mode:
    the output is deterministic, so the encoder must equal the HuggingFace model exactly where
    each site acts. A site dropped, moved or added where HuggingFace has none (DistilBERT's
    attention output, ALBERT's feed-forward output, XLM-R-XL's feed-forward output, which have no
    dropout) changes it; a p = 0.5 on/off check misses the added ones (the site acts anyway)."""
    torch.manual_seed(0)
    hf = _model(family, dropout=0.0)
    _randomize_biases(hf)
    enc = BertEncoder.from_hf(hf, backend="torch")
    assert enc.training
    ids, mask = _batch((6, 3), 6)
    real = mask.bool()
    with torch.no_grad():
        off = hf.eval()(ids, attention_mask=mask).last_hidden_state
    hf.train()
    drops = {n: m for n, m in hf.named_modules() if isinstance(m, torch.nn.Dropout)}
    acting = 0
    for site in drops:
        for n, m in drops.items():
            m.p = 1.0 if n == site else 0.0
        with torch.no_grad():
            want = hf(ids, attention_mask=mask).last_hidden_state
            out = enc(ids, attention_mask=mask)
        torch.testing.assert_close(out[real], want[real], rtol=1e-5, atol=1e-5, msg=lambda m: f"{site}: {m}")
        acting += bool((want - off)[real].abs().max() > 1e-3)
    # every site acts but ALBERT's layer Dropout, which transformers never calls
    assert acting == len(drops) - (family == "albert") >= 3


@pytest.mark.parametrize("family", ["bert", "xlm_roberta_xl"])
def test_encoder_starts_in_the_models_mode(family):
    """from_hf puts the encoder in the HuggingFace model's train/eval mode: an eval-mode model
    with dropout gives an encoder that is deterministic and equal to it without an .eval() call
    (the attention-probability dropout follows the encoder's own mode); a train-mode model gives
    a train-mode encoder. The shared HuggingFace modules keep their own modes."""
    torch.manual_seed(0)
    hf = _model(family, dropout=0.1).eval()
    enc = BertEncoder.from_hf(hf, backend="torch")
    ids, mask = _batch((9, 4, 1), 11)
    real = mask.bool()
    with torch.no_grad():
        torch.manual_seed(1)
        a = enc(ids, attention_mask=mask)
        torch.manual_seed(2)
        b = enc(ids, attention_mask=mask)
        want = hf(ids, attention_mask=mask).last_hidden_state
    assert torch.equal(a, b), "an eval-mode model's encoder must not drop"
    assert not any(m.training for m in enc.modules())  # its layers' ModuleList too
    torch.testing.assert_close(a[real], want[real], rtol=1e-5, atol=1e-5)
    train_hf = _model(family, dropout=0.1).train()
    train_enc = BertEncoder.from_hf(train_hf, backend="torch")
    assert all(m.training for m in train_enc.modules())
    # every output dropout is fused (its rate read), the Dropout(0) stand-ins of XLM-R XL too
    assert all(dropout_rate(layer.output_dropout) is not None for layer in train_enc.layers)
    with torch.no_grad():
        torch.manual_seed(1)
        c = train_enc(ids, attention_mask=mask)
        torch.manual_seed(2)
        d = train_enc(ids, attention_mask=mask)
    assert (c - d)[real].abs().max() > 1e-3, "a train-mode model's encoder must drop"
    hf.encoder.layer[0].attention.output.dropout.train()  # its own mode, left alone by from_hf
    BertEncoder.from_hf(hf, backend="torch")
    assert hf.encoder.layer[0].attention.output.dropout.training and not hf.training


def test_encoder_on_inference_tensor_parameters():
    """A model built (or loaded) under torch.inference_mode has inference-tensor parameters, which
    have no version counter to key the fused Q/K/V cache on: the encoder still runs, under
    inference_mode and under no_grad, and equals the HuggingFace model."""
    torch.manual_seed(0)
    with torch.inference_mode():
        hf = _model().eval()
        enc = BertEncoder.from_hf(hf, backend="torch")
    assert all(p.is_inference() for p in hf.parameters())
    ids, mask = _batch((9, 4, 1), 11)
    real = mask.bool()
    with torch.inference_mode():
        out = enc(ids, attention_mask=mask)
        again = enc(ids, attention_mask=mask)
        want = hf(ids, attention_mask=mask).last_hidden_state
    with torch.no_grad():
        plain = enc(ids, attention_mask=mask)
    torch.testing.assert_close(out[real], want[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(out, again) and torch.equal(out, plain)


def test_encoder_refuses_an_input_its_embeddings_do_not_take():
    """An input the HuggingFace embeddings do not take (DistilBERT has no token types) is refused
    with ValueError, as _embed documents, not silently dropped; BERT's embeddings take
    token_type_ids and position_ids, and the encoder equals the model given the same."""
    torch.manual_seed(0)
    ids, mask = _batch((6, 3), 6)
    types = torch.randint(0, 2, ids.shape)
    enc = BertEncoder.from_hf(_model("distilbert").eval(), backend="torch")
    with pytest.raises(ValueError, match="takes no token_type_ids"):
        enc(ids, attention_mask=mask, token_type_ids=types)
    hf = _model().eval()
    enc = BertEncoder.from_hf(hf, backend="torch")
    pos = torch.randint(0, 40, ids.shape)
    real = mask.bool()
    with torch.no_grad():
        out = enc(ids, attention_mask=mask, token_type_ids=types, position_ids=pos)
        want = hf(ids, attention_mask=mask, token_type_ids=types, position_ids=pos).last_hidden_state
        plain = enc(ids, attention_mask=mask)
    torch.testing.assert_close(out[real], want[real], rtol=1e-5, atol=1e-5)
    assert (out - plain)[real].abs().max() > 1e-3


def test_encoder_constructor_refuses_pre_ln_layers_without_final_norm():
    """Pre-LN layers need the LayerNorm after the last layer (the model's last_hidden_state is
    normed): built without final_norm, or with post-LN and pre-LN layers mixed, BertEncoder
    refuses with ValueError; with it, the encoder equals from_hf's."""
    from fastbert.models import BertLayer, PreLNBertLayer

    torch.manual_seed(0)
    hf = _model("xlm_roberta_xl").eval()
    layers = [PreLNBertLayer(layer, backend="torch") for layer in hf.encoder.layer]
    with pytest.raises(ValueError, match="final_norm"):
        BertEncoder(hf.embeddings, layers, backend="torch")
    with pytest.raises(ValueError, match="final_norm"):
        BertEncoder(hf.embeddings, layers, final_norm=torch.nn.Identity(), backend="torch")
    post = _model().eval()
    with pytest.raises(ValueError, match="all post-LN"):
        BertEncoder(hf.embeddings, [BertLayer(post.encoder.layer[0]), layers[0]], backend="torch")
    enc = BertEncoder(hf.embeddings, layers, final_norm=hf.encoder.LayerNorm, backend="torch").eval()
    ids, mask = _batch((6, 3), 6)
    with torch.no_grad():
        assert torch.equal(enc(ids, attention_mask=mask),
                           BertEncoder.from_hf(hf, backend="torch")(ids, attention_mask=mask))
