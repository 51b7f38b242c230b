"""Whole-encoder cases: inference latency and a training step (forward + backward) of BERT-base,
of two encoders with relative-position attention, DeBERTa-v3-base and MPNet-base, of
ModernBERT-base (transformers 5.x; against HF eager and SDPA), and inference of DistilBERT-base;
and ``torch.nn.TransformerEncoder`` of BERT-base's shape (:func:`torch_encoder_case`: torch's
padded and nested-tensor paths against ``fastbert.nn.TransformerEncoder``).

Implementations, all with the same weights (a model of random weights built from its config, no
download): HuggingFace ``BertModel`` with eager attention, with SDPA attention, ``torch.compile``
of the SDPA model, ``fastbert.optimize`` applied to the SDPA model, and the padding-free
``fastbert.models.BertEncoder.from_hf`` (BERT, DistilBERT, MPNet; ModernBERT: ``ModernBertEncoder``). DeBERTa-v3 and MPNet (``arch``) have eager attention
only in transformers: HF eager, its ``torch.compile`` and ``fastbert.optimize``, with HF eager as
the yardstick. fastbert's model-level APIs are looked up by name; where one is missing or refuses
the model, the row says why. Their flops are BERT's formula at the same sizes (DeBERTa's and MPNet's
relative-position scores are not credited), so compare implementations within a case; ModernBERT's
count its GeGLU MLP and, in its local layers, the query-key pairs inside the 128-token window
(:func:`~fastbert.benchmarks.common.modernbert_flops`).

Batches: B32 at L 128 and 512, "full" (every token real) or "half" (lengths uniform in [1, L],
mean about L / 2, the padding-free encoder's case). The model is in fp16 (``model.half()``), or,
in the "amp" cases, kept in fp32 and run under ``torch.autocast`` to bf16: mixed-precision
training as it is usually done (recorded as dtype "amp-bf16"). The flops count the real tokens only
(:func:`~fastbert.benchmarks.common.bert_flops`), so a padded implementation is credited with the
useful work. Dropout is 0 so that train-mode outputs can be checked. Outputs (real tokens only)
are checked against the fp32 HuggingFace model, with the fp16 HuggingFace SDPA model's error as the
yardstick (factor 3: twelve layers accumulate rounding differently from one kernel to another).
"""
from __future__ import annotations

import inspect
from typing import Dict, List, Optional, Tuple

import torch

from .attention import seqlens
from .common import (Case, Impl, Prepared, Unavailable, bert_flops, compare, configure_compile,
                     dtype_name, modernbert_flops, ns, reason_text)

__all__ = ["cases", "bert_case", "torch_encoder_case", "BERT_BASE", "ARCHS", "TORCH_ENCODER"]

FAMILY = "bert"
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "vocab_size": 30522, "max_position_embeddings": 512}
# arch -> (transformers config class, its base sizes and options, the HF attention it is measured
# and checked against). DeBERTa-v3-base's and MPNet-base's published configs.
ARCHS = {
    "bert": ("BertConfig", BERT_BASE, "sdpa"),
    "deberta-v3": ("DebertaV2Config", dict(
        BERT_BASE, vocab_size=128100, relative_attention=True, position_buckets=256,
        norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
        position_biased_input=False, max_relative_positions=-1, type_vocab_size=0,
        layer_norm_eps=1e-7), "eager"),
    "mpnet": ("MPNetConfig", dict(BERT_BASE, vocab_size=30527, max_position_embeddings=514,
                                  relative_attention_num_buckets=32, layer_norm_eps=1e-5), "eager"),
    "distilbert": ("DistilBertConfig", dict(BERT_BASE, num_hidden_layers=6), "sdpa"),
    "modernbert": ("ModernBertConfig", dict(
        hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152,
        vocab_size=50368, max_position_embeddings=8192, global_attn_every_n_layers=3,
        local_attention=128, pad_token_id=50283, eos_token_id=50282, bos_token_id=50281,
        cls_token_id=50281, sep_token_id=50282), "sdpa"),
}
# arch -> fastbert's padding-free encoder of it (fastbert.models)
ENCODERS = {"bert": "BertEncoder", "distilbert": "BertEncoder", "mpnet": "BertEncoder",
            "modernbert": "ModernBertEncoder"}
CHECK_FACTOR = 3.0
REFUSED = (NotImplementedError, ValueError, TypeError)   # how fastbert's model APIs say "not this model"

_BASE_STATE: Dict[tuple, dict] = {}


def _config(overrides: Optional[dict], arch: str = "bert"):
    cls_name, base, _ = ARCHS[arch]
    try:
        import transformers
        cls = getattr(transformers, cls_name)
    except (ImportError, AttributeError) as e:
        raise Unavailable(f"transformers (with {cls_name}) is not installed ({e})") from None
    kw = dict(base, **(overrides or {}))
    if arch == "modernbert":  # its dropouts default to 0
        return cls(**kw)
    if arch == "distilbert":  # its own names for BERT's sizes
        names = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                 "intermediate_size": "hidden_dim"}
        return cls(dropout=0.0, attention_dropout=0.0, **{names.get(k, k): v for k, v in kw.items()})
    return cls(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)


def _modernbert_pattern(sizes: dict, overrides: Optional[dict]) -> Tuple[List[str], int]:
    """(the attention type of each layer, the local half-window) of the ModernBERT that
    ``overrides`` builds: read from the transformers config where it can be built (5.x keeps a
    ``layer_types`` list, which a caller may set directly; 4.x only ``global_attn_every_n_layers``),
    else from ``sizes``, the way transformers derives them."""
    try:
        cfg = _config(overrides, "modernbert")
    except Unavailable:
        cfg = None
    # 4.x stores an unknown layer_types keyword without using it: honour it only where declared
    declared = cfg is not None and "layer_types" in type(cfg)().to_dict()
    types = getattr(cfg, "layer_types", None) if declared else None
    if types is None:
        every = getattr(cfg, "global_attn_every_n_layers", None) or sizes.get("global_attn_every_n_layers", 3)
        types = ["full_attention" if i % every == 0 else "sliding_attention"
                 for i in range(sizes["num_hidden_layers"])]
    local = getattr(cfg, "local_attention", None) or sizes.get("local_attention", 128)
    return list(types), local // 2


def _hf_model(config: Optional[dict], attn: str, dtype: torch.dtype, device, arch: str = "bert"):
    """An ``arch`` model (BertModel, ...) of its base sizes (``config`` overrides them) with
    ``attn`` attention and the shared random weights of those sizes."""
    cfg = _config(config, arch)
    from transformers import AutoModel

    key = repr((arch, sorted(dict(ARCHS[arch][1], **(config or {})).items())))
    try:
        with torch.device(device):  # random init on the device: seconds faster for BERT-base
            model = AutoModel.from_config(cfg, attn_implementation=attn)
    except (ValueError, ImportError, TypeError) as e:
        raise Unavailable(f"transformers cannot build the {arch} model with attn_implementation="
                          f"{attn!r}: {e}") from None
    got = getattr(model.config, "_attn_implementation", attn)
    if got != attn:
        raise Unavailable(f"transformers gave attn_implementation={got!r} instead of {attn!r}")
    if key not in _BASE_STATE:  # identical weights for every implementation
        _BASE_STATE.clear()
        _BASE_STATE[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(_BASE_STATE[key])
    return model.to(device=device, dtype=dtype)


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "last_hidden_state", None) is not None:
        return out.last_hidden_state
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the hidden states in a {type(out).__name__}")


def _hf_forward(model):
    return lambda s: model(input_ids=s.ids, attention_mask=s.mask).last_hidden_state


def bert_case(b: int, l: int, fill: str = "full", *, pass_: str = "fwd",
              dtype: torch.dtype = torch.float16, config: Optional[dict] = None,
              quick: bool = False, amp: bool = False, arch: str = "bert") -> Case:
    """An encoder over a (b, l) batch: ``arch`` one of :data:`ARCHS` ("bert", "deberta-v3",
    "mpnet", "distilbert", "modernbert"); ``config`` overrides its base sizes (tests use tiny ones). ``amp``: the model in fp32
    under ``torch.autocast`` to ``dtype`` (else in ``dtype``)."""
    if fill not in ("full", "half"):
        raise ValueError(f"fill must be 'full' or 'half', got {fill!r}")
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    base_attn = ARCHS[arch][2]  # the HF attention to compile, optimize and check against
    sizes = dict(ARCHS[arch][1], **(config or {}))
    lens = [l] * b if fill == "full" else seqlens(b, l, seed=2 * l + 3)
    dt = f"amp-{dtype_name(dtype)}" if amp else dtype_name(dtype)
    model_dtype = torch.float32 if amp else dtype
    step = "infer" if pass_ == "fwd" else "train"
    name = f"{arch}-{step}-B{b}-L{l}-{fill}-{dt}"
    if config:
        name += "-h{hidden_size}-x{num_hidden_layers}".format(**sizes)
    params = {"arch": arch, "B": b, "L": l, "fill": fill, "mean_len": sum(lens) / b, "seqlens": lens,
              "hidden": sizes["hidden_size"], "layers": sizes["num_hidden_layers"],
              "heads": sizes["num_attention_heads"], "intermediate": sizes["intermediate_size"],
              "dropout": 0.0}
    if arch == "modernbert":
        layer_types, window = _modernbert_pattern(sizes, config)
        work = modernbert_flops(lens, hidden=sizes["hidden_size"], layers=sizes["num_hidden_layers"],
                                intermediate=sizes["intermediate_size"], window=window, pass_=pass_,
                                layer_types=layer_types)
    else:
        work = bert_flops(lens, hidden=sizes["hidden_size"], layers=sizes["num_hidden_layers"],
                          intermediate=sizes["intermediate_size"], pass_=pass_)
    training = pass_ != "fwd"

    def setup(device):
        lens_t = torch.tensor(lens, device=device)
        mask = (torch.arange(l, device=device)[None, :] < lens_t[:, None]).long()
        ids = torch.randint(0, sizes["vocab_size"], (b, l), device=device)
        # the output's dtype: the model's; under autocast fp32 too (the residual stream stays fp32:
        # each output LayerNorm normalises a bf16 matmul output plus an fp32 residual)
        do = torch.randn(b, l, sizes["hidden_size"], device=device, dtype=model_dtype)
        return ns(device=torch.device(device), ids=ids, mask=mask, do=do, cache={})

    def autocast(fwd):
        """``fwd`` under torch.autocast to ``dtype`` in the amp cases."""
        if not amp:
            return fwd

        def run(st):
            with torch.autocast(st.device.type, dtype=dtype):
                return fwd(st)
        return run

    def ready(model):
        model.train(training)
        params_ = [p for p in model.parameters() if p.requires_grad]
        return params_

    def hf(attn):
        def prepare(case, s):
            model = _hf_model(config, attn, model_dtype, s.device, arch)
            leaves = ready(model)
            return Prepared(autocast(_hf_forward(model)), leaves=lambda st: leaves)
        return prepare

    def hf_compiled(case, s):
        model = _hf_model(config, base_attn, model_dtype, s.device, arch)
        leaves = ready(model)
        configure_compile()
        compiled = torch.compile(model)
        return Prepared(autocast(lambda st: compiled(input_ids=st.ids,
                                                     attention_mask=st.mask).last_hidden_state),
                        leaves=lambda st: leaves)

    def fb_optimize(case, s):
        import fastbert
        optimize = getattr(fastbert, "optimize", None)
        if not callable(optimize):
            try:
                from fastbert.optimize import optimize
            except ImportError as e:
                raise Unavailable(f"fastbert.optimize is not available in this checkout ({e})") from None
        model = _hf_model(config, base_attn, model_dtype, s.device, arch)
        try:
            report = optimize(model)
        except REFUSED as e:
            raise Unavailable(f"fastbert.optimize refused the model: {reason_text(e)}") from None
        leaves = ready(model)
        note = str(report).strip().splitlines()[0][:160] if report is not None else ""
        return Prepared(autocast(_hf_forward(model)), leaves=lambda st: leaves, note=note)

    encoder_name = ENCODERS.get(arch)

    def fb_encoder(case, s):
        import fastbert.models
        encoder_cls = getattr(fastbert.models, encoder_name, None)
        if encoder_cls is None:
            raise Unavailable(f"fastbert.models.{encoder_name} is not available in this checkout")
        hf_model = _hf_model(config, base_attn, model_dtype, s.device, arch)
        try:
            enc = encoder_cls.from_hf(hf_model)
        except REFUSED as e:
            raise Unavailable(f"{encoder_name}.from_hf refused the model: {reason_text(e)}") from None
        enc = enc.to(device=s.device, dtype=model_dtype) if isinstance(enc, torch.nn.Module) else enc
        leaves = ready(enc)
        sig = inspect.signature(enc.forward).parameters
        if "input_ids" in sig:
            fwd = lambda st: _first_tensor(enc(input_ids=st.ids, attention_mask=st.mask))  # noqa: E731
        elif "hidden_states" in sig:
            emb = hf_model.embeddings
            fwd = lambda st: _first_tensor(enc(hidden_states=emb(input_ids=st.ids),  # noqa: E731
                                               attention_mask=st.mask))
        else:
            fwd = lambda st: _first_tensor(enc(st.ids, st.mask))  # noqa: E731
        # unpadding reads the lengths on the host: no CUDA graph
        return Prepared(autocast(fwd), leaves=lambda st: leaves, graph_safe=False)

    def check(s, out, grads, variant):
        if "ref" not in s.cache:
            with torch.no_grad():
                ref_model = _hf_model(config, base_attn,
                                      torch.float64 if model_dtype == torch.float32 and not amp
                                      else torch.float32, s.device, arch).eval()
                low_model = _hf_model(config, base_attn, model_dtype, s.device, arch).eval()
                s.cache["ref"] = _hf_forward(ref_model)(s)
                s.cache["low"] = autocast(_hf_forward(low_model))(s)  # the yardstick: HF SDPA / eager
                del ref_model, low_model
        real = s.mask.bool()
        return compare([("hidden states (real tokens)", out.detach()[real], s.cache["ref"][real],
                         s.cache["low"][real])], factor=CHECK_FACTOR)

    compile_skip = "skipped in --quick: compiling a 12-layer model takes minutes"
    # DeBERTa and MPNet have no SDPA attention in HF; DeBERTa has no padding-free encoder here
    impls = [Impl("hf-eager", hf("eager"))]
    if base_attn == "sdpa":
        impls.append(Impl("hf-sdpa", hf("sdpa")))
    impls += [
        Impl(f"hf-{base_attn}-compile", hf_compiled, skip_in_quick=compile_skip),
        Impl("fastbert-optimize", fb_optimize, ours=True),
    ]
    if encoder_name is not None:
        impls.append(Impl(f"fastbert-{encoder_name}", fb_encoder, ours=True))
    return Case(FAMILY, "bert", name, pass_, dtype, params, "TFLOP/s", work, "L",
                f"{arch} {step} {fill} {dt}", setup, impls, check=check, rotate=False, quick=quick,
                dtype_label=dt)


TORCH_ENCODER = {"d_model": 768, "nhead": 12, "dim_feedforward": 3072, "num_layers": 12}
_TORCH_STATE: Dict[tuple, dict] = {}


def _torch_encoder(sizes: dict, nested: bool, dtype: torch.dtype, device):
    """A ``torch.nn.TransformerEncoder`` of BERT-base's shape (post-LN, GELU, batch first, dropout
    0), the same random weights for every implementation of a case."""
    layer = torch.nn.TransformerEncoderLayer(sizes["d_model"], sizes["nhead"], sizes["dim_feedforward"],
                                             dropout=0.0, activation="gelu", batch_first=True,
                                             device=device)
    model = torch.nn.TransformerEncoder(layer, sizes["num_layers"], enable_nested_tensor=nested)
    key = repr(sorted(sizes.items()))
    if key not in _TORCH_STATE:
        _TORCH_STATE.clear()
        _TORCH_STATE[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(_TORCH_STATE[key])
    return model.to(device=device, dtype=dtype)


def torch_encoder_case(b: int, l: int, fill: str = "half", *, pass_: str = "fwd",
                       dtype: torch.dtype = torch.float16, config: Optional[dict] = None,
                       quick: bool = False) -> Case:
    """``torch.nn.TransformerEncoder`` (BERT-base's shape; ``config`` overrides
    :data:`TORCH_ENCODER`) over a (b, l) batch of hidden states with a key padding mask: torch's
    padded path, its nested-tensor fast path (inference only: eval under ``no_grad``, where torch
    packs the real tokens itself), ``torch.compile`` of the padded path, ``fastbert.optimize``
    (its layers swapped, still padded) and ``fastbert.nn.TransformerEncoder`` (padding-free).
    Checked on the real tokens against the fp32 padded model, torch's padded path in ``dtype`` as
    the yardstick."""
    if fill not in ("full", "half"):
        raise ValueError(f"fill must be 'full' or 'half', got {fill!r}")
    sizes = dict(TORCH_ENCODER, **(config or {}))
    lens = [l] * b if fill == "full" else seqlens(b, l, seed=2 * l + 3)
    step = "infer" if pass_ == "fwd" else "train"
    name = f"torch-encoder-{step}-B{b}-L{l}-{fill}-{dtype_name(dtype)}"
    if config:
        name += "-h{d_model}-x{num_layers}".format(**sizes)
    params = {"arch": "torch-encoder", "B": b, "L": l, "fill": fill, "mean_len": sum(lens) / b,
              "seqlens": lens, "hidden": sizes["d_model"], "layers": sizes["num_layers"],
              "heads": sizes["nhead"], "intermediate": sizes["dim_feedforward"], "dropout": 0.0}
    work = bert_flops(lens, hidden=sizes["d_model"], layers=sizes["num_layers"],
                      intermediate=sizes["dim_feedforward"], pass_=pass_)
    training = pass_ != "fwd"

    def setup(device):
        lens_t = torch.tensor(lens, device=device)
        pad = torch.arange(l, device=device)[None, :] >= lens_t[:, None]  # True = padded
        x = torch.randn(b, l, sizes["d_model"], device=device, dtype=dtype)
        # the upstream gradient is 0 at padded positions: no real token depends on them
        do = torch.randn(b, l, sizes["d_model"], device=device, dtype=dtype) * (~pad)[..., None]
        return ns(device=torch.device(device), x=x, pad=pad, mask=~pad, do=do, cache={})

    def prepared(model, note=""):
        model.train(training)
        leaves = [p for p in model.parameters() if p.requires_grad]
        fwd = lambda st: model(st.x, src_key_padding_mask=st.pad)  # noqa: E731
        return Prepared(fwd, leaves=lambda st: leaves, graph_safe=False, note=note)

    def padded(case, s):
        return prepared(_torch_encoder(sizes, False, dtype, s.device))

    def nested(case, s):
        if training:
            raise Unavailable("torch's nested-tensor fast path is inference-only")
        model = _torch_encoder(sizes, True, dtype, s.device).eval()

        def fwd(st):
            with torch.no_grad():  # the fast path's condition
                return model(st.x, src_key_padding_mask=st.pad)
        with torch.no_grad():
            taken = bool((fwd(s)[s.pad] == 0).all())
        note = "torch took its nested-tensor fast path" if taken else \
            "torch did not take its nested-tensor fast path (padded path ran)"
        return Prepared(fwd, graph_safe=False, note=note)

    def compiled(case, s):
        model = _torch_encoder(sizes, False, dtype, s.device)
        configure_compile()
        out = prepared(model)
        c = torch.compile(model)
        return Prepared(lambda st: c(st.x, src_key_padding_mask=st.pad), leaves=out.leaves,
                        graph_safe=False)

    def fb_optimize(case, s):
        from fastbert.optimize import optimize
        model = _torch_encoder(sizes, False, dtype, s.device)
        report = optimize(model)
        return prepared(model, note=str(report).strip().splitlines()[0][:160])

    def fb_encoder(case, s):
        import fastbert.nn
        encoder_cls = getattr(fastbert.nn, "TransformerEncoder", None)
        if encoder_cls is None:
            raise Unavailable("fastbert.nn.TransformerEncoder is not available in this checkout")
        return prepared(encoder_cls.from_torch(_torch_encoder(sizes, False, dtype, s.device)))

    def check(s, out, grads, variant):
        if "ref" not in s.cache:
            with torch.no_grad():
                ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
                ref = _torch_encoder(sizes, False, ref_dtype, s.device).eval()
                low = _torch_encoder(sizes, False, dtype, s.device).eval()
                s.cache["ref"] = ref(s.x.to(ref_dtype), src_key_padding_mask=s.pad)
                s.cache["low"] = low(s.x, src_key_padding_mask=s.pad)
                del ref, low
        real = s.mask
        return compare([("hidden states (real tokens)", out.detach()[real], s.cache["ref"][real],
                         s.cache["low"][real])], factor=CHECK_FACTOR)

    impls = [Impl("torch-padded", padded)]
    if not training:
        impls.append(Impl("torch-nested", nested))
    impls += [
        Impl("torch-compile", compiled,
             skip_in_quick="skipped in --quick: compiling a 12-layer model takes minutes"),
        Impl("fastbert-optimize", fb_optimize, ours=True),
        Impl("fastbert-TransformerEncoder", fb_encoder, ours=True),
    ]
    return Case(FAMILY, "bert", name, pass_, dtype, params, "TFLOP/s", work, "L",
                f"torch-encoder {step} {fill} {dtype_name(dtype)}", setup, impls, check=check,
                rotate=False, quick=quick)


def cases(quick: bool = False) -> List[Case]:
    out = []
    for pass_ in ("fwd", "fwd+bwd"):
        for l in (128, 512):
            for fill in ("full", "half"):
                q = (pass_ == "fwd" and (l == 128 or fill == "half")) or \
                    (pass_ == "fwd+bwd" and l == 128 and fill == "full")
                out.append(bert_case(32, l, fill, pass_=pass_, quick=q))
    # mixed-precision training (fp32 weights, autocast to bf16), the usual way BERT is trained
    for l in (128, 512):
        out.append(bert_case(32, l, "full", pass_="fwd+bwd", dtype=torch.bfloat16, amp=True,
                             quick=l == 128))
    # relative-position encoders: fp16 inference on padded batches, mixed-precision training
    for arch in ("deberta-v3", "mpnet"):
        for l in (128, 512):
            out.append(bert_case(32, l, "half", arch=arch, quick=l == 128))
            out.append(bert_case(32, l, "full", pass_="fwd+bwd", dtype=torch.bfloat16, amp=True,
                                 arch=arch, quick=l == 128 and arch == "deberta-v3"))
    # DistilBERT-base (6 layers): inference on padded batches, where the padding-free encoder pays
    for l in (128, 512):
        out.append(bert_case(32, l, "half", arch="distilbert", quick=l == 128))
    # ModernBERT-base: its local layers (a 128-token window) pay off from L 512
    for l in (512, 1024):
        out.append(bert_case(32, l, "half", arch="modernbert", quick=l == 512))
        out.append(bert_case(32, l, "full", pass_="fwd+bwd", dtype=torch.bfloat16, amp=True,
                             arch="modernbert"))
    # torch.nn.TransformerEncoder users: torch's padded and nested-tensor paths against
    # fastbert.nn.TransformerEncoder, on padded batches
    for l in (128, 512):
        out.append(torch_encoder_case(32, l, "half", quick=l == 128))
        out.append(torch_encoder_case(32, l, "half", pass_="fwd+bwd"))
    return [c for c in out if c.quick] if quick else out
