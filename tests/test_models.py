"""fastbert.models.BertEncoder: the padding-free encoder against the HuggingFace model it is built
from (BERT, RoBERTa, ELECTRA; small random configs), on the real tokens of padded batches, in eval
and train mode, with gradients; float32 checked against the HuggingFace model in float64 with
PyTorch's float32 error as the yardstick."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastbert  # noqa: E402
from fastbert import backends  # noqa: E402
from fastbert.models import BertEncoder  # noqa: E402
from fastbert.optimize import optimize  # noqa: E402
from fastbert.testing import DEVICE, assert_close  # noqa: E402

VOCAB = 99


def _model(family="bert", model_cls=None, dropout=0.0, **overrides):
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=dropout,
              attention_probs_dropout_prob=dropout, attn_implementation="eager")
    if family == "electra":
        kw["embedding_size"] = 16  # exercises ELECTRA's embeddings_project
    kw.update(overrides)
    config = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig,
              "electra": transformers.ElectraConfig}[family](**kw)
    name = model_cls or {"bert": "BertModel", "roberta": "RobertaModel", "electra": "ElectraModel"}[family]
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


@pytest.mark.parametrize("family", ["bert", "roberta", "electra"])
@pytest.mark.parametrize("lengths", [(9, 4, 1), (7, 7), (1,)], ids=["9-4-1", "full", "B1"])
def test_encoder_matches_hf_eval(family, lengths):
    torch.manual_seed(0)
    hf = _model(family).eval()
    enc = BertEncoder.from_hf(hf, backend="torch")
    ids, mask = _batch(lengths, max(lengths) + 2)
    _check(enc, hf, ids, mask)


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


@pytest.mark.parametrize("family,backend", [("bert", "torch"), ("roberta", "torch"), ("bert", "triton")])
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
        assert_close(p.grad, p_ref[name].grad, p_low[name].grad, name=f"grad {name}")
        checked += 1
    assert checked >= 30


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
    enc(ids, attention_mask=mask).pow(2).mean().backward()
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


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_encoder_half(dtype):
    """The GPU path (default backend, compiled kernels): outputs and gradients within 2x PyTorch's
    own half-precision error, BERT with head dim 64 and awkward lengths."""
    torch.manual_seed(0)
    hf = _model(hidden_size=256, num_attention_heads=4, intermediate_size=1024,
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
