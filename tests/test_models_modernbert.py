"""fastbert.models.ModernBertEncoder: the padding-free ModernBERT encoder against the transformers
5.x model it is built from (small random configs with local layers whose window is shorter than
the sequences), on the real tokens of padded batches, eval and train with gradients; float32
checked against the HuggingFace model in float64 with PyTorch's float32 error as the yardstick."""
import copy
import importlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

from packaging.version import Version  # noqa: E402

from fastbert import backends  # noqa: E402
from fastbert.models import ModernBertEncoder  # noqa: E402
from fastbert.optimize import optimize  # noqa: E402
from fastbert.testing import DEVICE, assert_close, assert_compiled_encoder_matches  # noqa: E402

TF5 = Version(transformers.__version__) >= Version("5")
needs_tf5 = pytest.mark.skipif(not TF5, reason="ModernBertEncoder is built on transformers 5.x's "
                               "ModernBERT (test_transformers_4_modernbert_is_refused)")

VOCAB = 99


def _model(model_cls="ModernBertModel", **overrides):
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
              intermediate_size=48, max_position_embeddings=64, global_attn_every_n_layers=2,
              local_attention=4, pad_token_id=0, eos_token_id=1, bos_token_id=2, cls_token_id=2,
              sep_token_id=1, attn_implementation="sdpa")
    kw.update(overrides)
    return getattr(transformers, model_cls)(transformers.ModernBertConfig(**kw))


def _batch(lengths, seqlen, left=False, device="cpu"):
    ids = torch.randint(3, VOCAB, (len(lengths), seqlen), device=device)
    mask = torch.zeros(len(lengths), seqlen, dtype=torch.long, device=device)
    for i, n in enumerate(lengths):
        if left:
            mask[i, seqlen - n:] = 1
        else:
            mask[i, :n] = 1
    return ids, mask


def _hidden(m, ids, mask, **kw):
    out = m(ids, attention_mask=mask, **kw)
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def _check(enc, hf, ids, mask, train=False, **kw):
    """``enc`` vs ``hf`` (float32) and its float64 copy on the real tokens; with ``train`` also
    every parameter gradient (the same upstream gradient, real tokens only)."""
    ref_model = copy.deepcopy(hf)
    hf64 = copy.deepcopy(hf).double()
    real = mask.bool()
    for m in (enc, ref_model, hf64):
        m.train(train)
    with torch.set_grad_enabled(train):
        out = _hidden(enc, ids, mask, **kw)
        low = _hidden(ref_model, ids, mask, **kw)
        ref = _hidden(hf64, ids, mask, **kw)
    assert out.shape == low.shape and out.dtype == low.dtype
    assert_close(out[real], ref[real], low[real], name="last_hidden_state (real tokens)")
    assert (out[~real] == 0).all(), "padding positions must be 0"
    if not train:
        return
    g = torch.randn(ref.shape, dtype=torch.float64, device=ref.device) * real[..., None]
    for o in (out, low, ref):
        o.backward(g.to(o.dtype))
    p_low, p_ref = dict(ref_model.named_parameters()), dict(hf64.named_parameters())
    checked = 0
    for name, p in hf.named_parameters():
        if p_ref[name].grad is None:
            continue
        assert p.grad is not None, f"{name}: no gradient"
        assert_close(p.grad, p_ref[name].grad, p_low[name].grad, name=f"grad {name}")
        checked += 1
    assert checked == sum(1 for _ in hf.parameters())


@needs_tf5
@pytest.mark.parametrize("lengths,left", [((9, 4, 1), False), ((7, 7), False), ((8, 3), True), ((1,), False)],
                         ids=["9-4-1", "full", "left-padded", "B1"])
def test_encoder_matches_hf_eval(lengths, left):
    torch.manual_seed(0)
    hf = _model()
    enc = ModernBertEncoder.from_hf(hf, backend="torch")
    ids, mask = _batch(lengths, max(lengths) + 2, left=left)
    _check(enc, hf, ids, mask)


@needs_tf5
def test_encoder_training_gradients_and_inputs_embeds():
    torch.manual_seed(0)
    hf = _model()
    enc = ModernBertEncoder.from_hf(hf, backend="torch")
    ids, mask = _batch((9, 5, 2), 11)
    _check(enc, hf, ids, mask, train=True)
    # inputs_embeds and explicit position ids (an offset, as a packed data loader might give)
    embeds = hf.embeddings.tok_embeddings(ids).detach()
    pos = torch.arange(3, 14)[None].expand(3, 11)
    with torch.no_grad():
        enc.eval(), hf.eval()
        out = enc(inputs_embeds=embeds, attention_mask=mask, position_ids=pos)
        want = hf(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(out[real], want[real], rtol=1e-4, atol=1e-5)


@needs_tf5
def test_encoder_after_optimize_task_model_and_refusals():
    torch.manual_seed(0)
    hf = _model("ModernBertForMaskedLM")
    reference = copy.deepcopy(hf)
    optimize(hf)
    enc = ModernBertEncoder.from_hf(hf, backend="torch")
    ids, mask = _batch((6, 3), 8)
    with torch.no_grad():
        out = enc(ids, attention_mask=mask)
        want = reference.model(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(out[real], want[real], rtol=1e-4, atol=1e-5)
    assert {id(p) for p in enc.parameters()} <= {id(p) for p in hf.parameters()}
    with pytest.raises(ValueError, match="not a transformers 5.x ModernBERT model"):
        ModernBertEncoder.from_hf(transformers.BertModel(transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=48)))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        enc()


@needs_tf5
def test_encoder_refuses_a_gap_and_takes_an_empty_batch():
    """A row with padding between real tokens: the local layers' window would count other
    distances than transformers' (which counts padded positions), so it is refused, and
    optimize(padding_free=True) runs the original forward for it (same outputs). A batch without
    a real token gives zeros."""
    torch.manual_seed(0)
    hf = _model().eval()
    reference = copy.deepcopy(hf)
    enc = ModernBertEncoder.from_hf(hf, backend="torch")
    ids, mask = _batch((10, 8), 10)
    mask[0, 3:6] = 0
    with pytest.raises(ValueError, match="gap inside a row"):
        enc(ids, attention_mask=mask)
    optimize(hf, padding_free=True, backend="torch")
    with torch.no_grad():
        out, want = _hidden(hf, ids, mask), _hidden(reference, ids, mask)
        real = mask.bool()
        torch.testing.assert_close(out[real], want[real], rtol=1e-4, atol=1e-5)
        empty = enc(ids, attention_mask=torch.zeros_like(mask))
    assert empty.shape == (2, 10, 32) and (empty == 0).all()


@needs_tf5
def test_packed_row_with_varlen_kwargs_and_local_layers():
    """attn_implementation="fastbert" with DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    style inputs: transformers gives the local layers its sliding-window band for the packed row,
    which restates the window (no padding): each sequence attends to itself, within the window."""
    torch.manual_seed(0)
    importlib.import_module("fastbert.integrations.huggingface")  # registers "fastbert"
    model = _model(attn_implementation="fastbert").double().eval()
    reference = _model().double().eval()
    reference.load_state_dict(model.state_dict())
    lens = [9, 5]
    ids = torch.randint(3, VOCAB, (1, sum(lens)))
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.tensor([0, 9, 14], dtype=torch.int32)
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9,
                    max_length_k=9).last_hidden_state[0]
        want = torch.cat([reference(input_ids=s).last_hidden_state[0] for s in ids.split(lens, dim=1)])
    torch.testing.assert_close(out, want)


def _need_triton():
    need = ("varlen_attention", "add_layer_norm", "geglu", "layer_norm")
    missing = [op for op in need if "triton" not in backends.implementations(op)]
    reasons = backends.backend_reasons("triton", torch.device(DEVICE))
    if missing or reasons:
        pytest.skip(f"Triton backend unavailable: {missing or reasons}")


@needs_tf5
def test_encoder_triton_eval():
    _need_triton()
    torch.manual_seed(0)
    hf = _model(num_attention_heads=2).to(DEVICE)  # head dim 16
    enc = ModernBertEncoder.from_hf(hf, backend="triton")
    ids, mask = _batch((9, 4), 11, device=DEVICE)
    _check(enc, hf, ids, mask)


@needs_tf5
def test_encoder_compiles_as_one_graph_with_its_unpadding():
    """torch.compile(fullgraph=True) of the whole encoder, unpadding and rotary included (Dynamo
    told to capture data-dependent shapes, as for BertEncoder); a second batch with other lengths."""
    _need_triton()
    torch.manual_seed(0)
    hf = _model(num_hidden_layers=2).to(DEVICE).eval()  # a global and a local layer
    enc = ModernBertEncoder.from_hf(hf, backend="triton")
    assert_compiled_encoder_matches(enc, [_batch(lengths, 9, device=DEVICE)
                                          for lengths in ((9, 4, 1), (7, 9, 2))])


@pytest.mark.skipif(TF5, reason="transformers 4.x only")
def test_transformers_4_modernbert_is_refused():
    with pytest.raises(ValueError, match="not a transformers 5.x ModernBERT model"):
        ModernBertEncoder.from_hf(_model())


@needs_tf5
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_encoder_half(dtype):
    """The GPU path (default backend, compiled kernels): output and every gradient within 2x
    PyTorch's own half-precision error; head dim 64, a 16-token local window, awkward lengths."""
    torch.manual_seed(0)
    hf = _model(hidden_size=256, num_attention_heads=4, intermediate_size=384, local_attention=16,
                max_position_embeddings=160).to("cuda")
    hf64 = copy.deepcopy(hf).double()
    hf = hf.to(dtype)
    hf_low = copy.deepcopy(hf)
    enc = ModernBertEncoder.from_hf(hf)
    ids, mask = _batch((130, 97, 17, 1), 130, device="cuda")
    real = mask.bool()
    out = _hidden(enc, ids, mask)
    low = _hidden(hf_low, ids, mask)
    ref = _hidden(hf64, ids, mask)
    assert out.dtype == dtype
    assert_close(out[real], ref[real], low[real], name="output")
    g = torch.randn(ref.shape, dtype=torch.float64, device="cuda") * real[..., None]
    for o in (out, low, ref):
        o.backward(g.to(o.dtype))
    p_low, p_ref = dict(hf_low.named_parameters()), dict(hf64.named_parameters())
    for name, p in hf.named_parameters():
        if p_ref[name].grad is not None:
            assert_close(p.grad, p_ref[name].grad, p_low[name].grad, name=f"grad {name}")


@needs_tf5
@pytest.mark.parametrize("site", ["attention_probs", "attention_out", "mlp"])
def test_encoder_each_dropout_site_acts_in_train_mode(site):
    """With one dropout site on (every other p = 0), train output differs from eval on the real
    tokens: each site is live (a site silently off passes every equality-in-eval test)."""
    torch.manual_seed(0)
    hf = _model(attention_dropout=0.5, mlp_dropout=0.5)
    enc = ModernBertEncoder.from_hf(hf, backend="torch")
    for m in enc.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for layer in enc.layers:
        if site == "attention_probs":
            layer.attention_dropout = 0.5
        else:
            layer.attention_dropout = 0.0
            drop = layer.attn_drop if site == "attention_out" else layer.mlp_drop
            assert isinstance(drop, torch.nn.Dropout), type(drop)
            drop.p = 0.5
    ids, mask = _batch([6, 3], 6)
    real = mask.bool()
    with torch.no_grad():
        ev = _hidden(enc.eval(), ids, mask)
        tr = _hidden(enc.train(), ids, mask)
    assert (tr - ev)[real].abs().max() > 1e-3, f"{site} dropout had no effect in train mode"


@needs_tf5
def test_encoder_starts_in_the_models_mode():
    """from_hf puts the encoder in the HuggingFace model's train/eval mode: an eval-mode model with
    dropout gives, without an .eval() call, an encoder that is deterministic and equal to it (the
    attention-probability dropout follows the encoder's own mode); a train-mode model gives a
    train-mode encoder."""
    torch.manual_seed(0)
    hf = _model(attention_dropout=0.1, mlp_dropout=0.1, embedding_dropout=0.1).eval()
    enc = ModernBertEncoder.from_hf(hf, backend="torch")
    ids, mask = _batch((9, 4, 1), 11)
    real = mask.bool()
    with torch.no_grad():
        torch.manual_seed(1)
        a = enc(ids, attention_mask=mask)
        torch.manual_seed(2)
        b = enc(ids, attention_mask=mask)
        want = _hidden(hf, ids, mask)
    assert torch.equal(a, b), "an eval-mode model's encoder must not drop"
    assert not any(m.training for m in enc.modules())  # its layers' ModuleList too
    torch.testing.assert_close(a[real], want[real], rtol=1e-4, atol=1e-5)
    train_enc = ModernBertEncoder.from_hf(_model(attention_dropout=0.1).train(), backend="torch")
    assert all(m.training for m in train_enc.modules())
    with torch.no_grad():
        torch.manual_seed(1)
        c = train_enc(ids, attention_mask=mask)
        torch.manual_seed(2)
        d = train_enc(ids, attention_mask=mask)
    assert (c - d)[real].abs().max() > 1e-3, "a train-mode model's encoder must drop"


@needs_tf5
@pytest.mark.parametrize("activation", ["silu", "relu"])
def test_encoder_matches_hf_non_gelu_mlp(activation):
    """A GLU MLP with another activation than GELU (called, not fused into geglu): as
    transformers' ModernBertMLP, ``Wo(act(input) * gate)`` with ``input, gate = Wi(x).chunk(2)``,
    the activation on the first half; outputs and gradients equal the HuggingFace model's."""
    torch.manual_seed(0)
    hf = _model(hidden_activation=activation)
    enc = ModernBertEncoder.from_hf(hf, backend="torch")
    ids, mask = _batch((9, 4, 1), 11)
    _check(enc, hf, ids, mask)
    _check(enc, hf, ids, mask, train=True)


@needs_tf5
@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_encoder_follows_given_position_ids(left):
    """Given position_ids (B, L) are each token's position for the rotary embeddings, not its packed
    or padded index: positions with uneven steps, other in each row (the rotary scores depend on
    differences of positions, so a constant offset would not tell them apart), equal the
    HuggingFace model given the same; they differ from the default positions."""
    torch.manual_seed(0)
    hf = _model()
    with torch.no_grad():  # sharper attention than the init's (std 0.02): positions matter more
        for layer in hf.layers:
            layer.attn.Wqkv.weight.mul_(20)
    enc = ModernBertEncoder.from_hf(hf, backend="torch")
    ids, mask = _batch((9, 4, 7), 11, left=left)
    pos = torch.randint(1, 4, (3, 11)).cumsum(dim=1)  # steps of 1 to 3, at most 33 < 64
    _check(enc, hf, ids, mask, position_ids=pos)
    with torch.no_grad():
        enc.eval()
        default = enc(ids, attention_mask=mask)
        given = enc(ids, attention_mask=mask, position_ids=pos)
    assert (given - default)[mask.bool()].abs().max() > 1e-3


@needs_tf5
def test_attention_dropout_rate_is_the_attention_modules():
    """The layer's attention-probability dropout rate is the HuggingFace attention module's, read
    at each call (a rate set on the model after from_hf applies; setting it on the layer sets it
    there); an attention module without a numeric rate is refused when the encoder is built, not at
    its first training step; a layer pickled with its own copy of the rate (older fastbert) still
    reads and sets that copy."""
    torch.manual_seed(0)
    hf = _model(attention_dropout=0.0)
    enc = ModernBertEncoder.from_hf(hf, backend="torch")
    ids, mask = _batch([6, 3], 6)
    real = mask.bool()
    with torch.no_grad():
        ev = _hidden(enc.eval(), ids, mask)
        assert torch.equal(_hidden(enc.train(), ids, mask)[real], ev[real])  # rate 0: no drop
        for layer in hf.layers:
            layer.attn.attention_dropout = 0.5
        assert (_hidden(enc, ids, mask) - ev)[real].abs().max() > 1e-3
    enc.layers[0].attention_dropout = 0.25
    assert hf.layers[0].attn.attention_dropout == 0.25
    layer = enc.layers[1]
    del layer.__dict__["_hf_attention"]  # as unpickled from before the rate was shared
    layer.__dict__["attention_dropout"] = 0.125
    assert layer.attention_dropout == 0.125
    layer.attention_dropout = 0.0
    assert layer.attention_dropout == 0.0 and hf.layers[1].attn.attention_dropout == 0.5
    del hf.layers[0].attn.attention_dropout
    with pytest.raises(ValueError, match="attention_dropout to be a number"):
        ModernBertEncoder.from_hf(hf, backend="torch")
