"""A padding-free BERT encoder: remove the padding once, run every layer on the packed real tokens
(varlen attention + fused ops), put the padding back at the end.

This is the "effective transformer" of FasterTransformer and the padding-free design of
ByteTransformer: a batch whose mean length is half its padded length does half the work, in every
layer, instead of computing on padding and masking it out.

Usage::

    hf = transformers.BertModel.from_pretrained(path)           # or RoBERTa / ELECTRA / DistilBERT /
    enc = fastbert.models.BertEncoder.from_hf(hf)               # ALBERT / MPNet / XLM-R-XL, a task model
    hidden = enc(input_ids, attention_mask=attention_mask)     # (B, L, E), 0 at padding
    # == hf(input_ids, attention_mask=...).last_hidden_state on the real tokens

    # already packed tokens (e.g. a data loader that packs): (total, E) -> (total, E)
    out = enc.forward_packed(packed, cu_seqlens, max_seqlen)

The encoder shares the HuggingFace model's modules and Parameter objects (nothing is copied):
training it trains the HuggingFace model, and an optimizer built on either works on both.
"""
from __future__ import annotations

import inspect
import weakref
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .._validation import tensor_version
from ..nn._fuse import add_norm, layer_norm, matmul
from ..nn._utils import NoDropout, NoTorchScript, check_backend, plain_linear, set_own_mode
from ..nn.gelu import gelu_approximation
from ..padding import gap_refusal, pad_input, unpad_input

__all__ = ["BertEncoder", "BertLayer", "PreLNBertLayer"]


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"BertEncoder.from_hf: {message}")


def _bert_parts(hf_layer: nn.Module) -> dict:
    """The modules of a HuggingFace ``BertLayer`` (and its copies) under BertLayer's names."""
    sa = getattr(getattr(hf_layer, "attention", None), "self", None)
    so = getattr(getattr(hf_layer, "attention", None), "output", None)
    inter, out = getattr(hf_layer, "intermediate", None), getattr(hf_layer, "output", None)
    _require(all(m is not None for m in (sa, so, inter, out)),
             f"{type(hf_layer).__name__} is not a BERT layer (attention.self / .output, "
             "intermediate, output)")
    return dict(query=getattr(sa, "query", None), key=getattr(sa, "key", None),
                value=getattr(sa, "value", None), num_heads=sa.num_attention_heads,
                head_dim=sa.attention_head_size, attention_dropout=getattr(sa, "dropout", None),
                attention_dense=getattr(so, "dense", None), attention_norm=getattr(so, "LayerNorm", None),
                hidden_dropout=getattr(so, "dropout", None), intermediate=getattr(inter, "dense", None),
                activation=inter.intermediate_act_fn, output_dense=getattr(out, "dense", None),
                output_norm=getattr(out, "LayerNorm", None), output_dropout=getattr(out, "dropout", None))


def _distilbert_parts(hf_layer: nn.Module) -> dict:
    """The modules of a HuggingFace DistilBERT ``TransformerBlock`` under BertLayer's names (its
    attention output has no dropout: a Dropout(0) stands in)."""
    attn, ffn = hf_layer.attention, hf_layer.ffn
    return dict(query=getattr(attn, "q_lin", None), key=getattr(attn, "k_lin", None),
                value=getattr(attn, "v_lin", None), num_heads=attn.n_heads,
                head_dim=attn.dim // attn.n_heads, attention_dropout=getattr(attn, "dropout", None),
                attention_dense=getattr(attn, "out_lin", None), attention_norm=hf_layer.sa_layer_norm,
                hidden_dropout=nn.Dropout(0.0), intermediate=getattr(ffn, "lin1", None),
                activation=ffn.activation, output_dense=getattr(ffn, "lin2", None),
                output_norm=hf_layer.output_layer_norm, output_dropout=getattr(ffn, "dropout", None))


def _albert_parts(hf_layer: nn.Module) -> dict:
    """The modules of a HuggingFace ``AlbertLayer`` under BertLayer's names (no dropout after its
    feed-forward: a Dropout(0) stands in)."""
    attn = hf_layer.attention
    return dict(query=getattr(attn, "query", None), key=getattr(attn, "key", None),
                value=getattr(attn, "value", None), num_heads=attn.num_attention_heads,
                head_dim=attn.attention_head_size,
                attention_dropout=getattr(attn, "attention_dropout", None),
                attention_dense=getattr(attn, "dense", None), attention_norm=getattr(attn, "LayerNorm", None),
                hidden_dropout=getattr(attn, "output_dropout", None),
                intermediate=getattr(hf_layer, "ffn", None), activation=hf_layer.activation,
                output_dense=getattr(hf_layer, "ffn_output", None),
                output_norm=hf_layer.full_layer_layer_norm, output_dropout=_no_dropout(hf_layer))


def _mpnet_parts(hf_layer: nn.Module) -> dict:
    """The modules of a HuggingFace ``MPNetLayer`` under BertLayer's names: its self-attention
    holds the output projection ``o``; ``LayerNorm(dropout(o(ctx)) + x)`` is BERT's output
    sublayer. The relative-position bias comes from the encoder (see :class:`BertEncoder`)."""
    attention, inter, out = hf_layer.attention, hf_layer.intermediate, hf_layer.output
    sa = attention.attn
    return dict(query=getattr(sa, "q", None), key=getattr(sa, "k", None), value=getattr(sa, "v", None),
                num_heads=sa.num_attention_heads, head_dim=sa.attention_head_size,
                attention_dropout=getattr(sa, "dropout", None), attention_dense=getattr(sa, "o", None),
                attention_norm=getattr(attention, "LayerNorm", None),
                hidden_dropout=getattr(attention, "dropout", None),
                intermediate=getattr(inter, "dense", None), activation=inter.intermediate_act_fn,
                output_dense=getattr(out, "dense", None), output_norm=getattr(out, "LayerNorm", None),
                output_dropout=getattr(out, "dropout", None), attention_dropout_called=True)


def _pre_ln_parts(hf_layer: nn.Module) -> dict:
    """The modules of a pre-LayerNorm layer (XLM-RoBERTa-XL's, RoBERTa-PreLayerNorm's) under
    PreLNBertLayer's names: ``attention_norm`` is the LayerNorm before the self-attention,
    ``output_norm`` the one before the feed-forward (XLM-R XL's layer has no dropout after its
    feed-forward: a Dropout(0) stands in)."""
    attn, inter = hf_layer.attention, hf_layer.intermediate
    if hasattr(attn, "self_attn_layer_norm"):  # XLM-RoBERTa-XL: the second norm is the layer's
        norms = (attn.self_attn_layer_norm, getattr(hf_layer, "LayerNorm", None))
    else:  # RoBERTa-PreLayerNorm: each norm inside the sublayer it feeds
        norms = (attn.LayerNorm, getattr(inter, "LayerNorm", None))
    parts = _bert_parts(hf_layer)
    parts.update(attention_norm=norms[0], output_norm=norms[1],
                 output_dropout=getattr(hf_layer.output, "dropout", None))
    if parts["output_dropout"] is None:
        parts["output_dropout"] = _no_dropout(hf_layer)
    return parts


def _no_dropout(hf_layer: nn.Module) -> nn.Dropout:
    """A Dropout(0) where the layer has none, in its mode (fastbert's own class: then the
    encoder's, as ``set_own_mode`` sets it)."""
    return NoDropout(0.0).train(hf_layer.training)


def _is_pre_ln(hf_layer: nn.Module) -> bool:
    attn = getattr(hf_layer, "attention", None)
    return hasattr(attn, "self_attn_layer_norm") or (
        hasattr(attn, "LayerNorm") and hasattr(getattr(hf_layer, "intermediate", None), "LayerNorm"))


def _layer_parts(hf_layer: nn.Module) -> dict:
    if hasattr(hf_layer, "sa_layer_norm"):
        return _distilbert_parts(hf_layer)
    if hasattr(hf_layer, "full_layer_layer_norm"):
        return _albert_parts(hf_layer)
    if _is_pre_ln(hf_layer):
        return _pre_ln_parts(hf_layer)
    if hasattr(getattr(hf_layer, "attention", None), "attn"):
        return _mpnet_parts(hf_layer)
    return _bert_parts(hf_layer)


class BertLayer(nn.Module, NoTorchScript):
    """One post-LN BERT layer on packed tokens, sharing a HuggingFace ``BertLayer``'s modules.

    forward(x (T, E), cu_seqlens (N + 1,) int32, max_seqlen, attn_bias=None) -> (T, E)::

        qkv = x @ [Wq; Wk; Wv]^T + b                       (one matmul)
        ctx = varlen_attention(q, k, v, cu_seqlens, attn_mask=attn_bias)  (dropout on the probabilities)
        a   = add_layer_norm(ctx @ Wo^T, x, ln1, input_bias=bo, dropout)
        h   = bias_gelu(a @ W1^T, b1)                      (another activation: act(a @ W1^T + b1))
        out = add_layer_norm(h @ W2^T, a, ln2, input_bias=b2, dropout)

    The fused [3E, E] weight and [3E] bias are concatenated on every call while a gradient can
    flow to them (grad mode on and one of the six tensors requires grad). Otherwise (``no_grad`` /
    ``inference_mode``, or frozen Q/K/V) they are made once and reused until one of the six
    tensors changes: replaced, moved or cast (``.to()``, ``.half()``), or updated in place
    (optimizer step, ``load_state_dict``): the cache is keyed on each tensor's identity,
    ``data_ptr``, dtype, device and version counter. Writes through ``.data``
    (``weight.data.copy_(...)``) bypass the version counter: call :meth:`clear_qkv_cache` after
    them. The cache is a plain attribute (not a buffer: ``state_dict`` is unchanged), costs one
    extra copy of the Q/K/V weights, and is left out of ``deepcopy`` / pickling.
    """

    def __init__(self, hf_layer: nn.Module, *, backend: Optional[str] = None) -> None:
        super().__init__()
        parts = _layer_parts(hf_layer)
        # Linears, LayerNorms and the output Dropouts are fused where they run plainly and called
        # otherwise (a LoRA adapter, a quantized Linear: fastbert.nn._fuse); the attention
        # probabilities' Dropout gives its rate to the attention kernel
        for name in ("query", "key", "value", "attention_dense", "intermediate", "output_dense",
                     "attention_norm", "output_norm", "hidden_dropout", "output_dropout"):
            _require(isinstance(parts[name], nn.Module), f"expected a module for {name}")
        _require(isinstance(parts["attention_dropout"], nn.Dropout), "expected a Dropout for attention_dropout")
        self.attention_dropout_called = bool(parts.pop("attention_dropout_called", False))
        self.num_heads = int(parts.pop("num_heads"))
        self.head_dim = int(parts.pop("head_dim"))
        for name, module in parts.items():
            setattr(self, name, module)
        self.backend = backend

    def _fused_qkv(self) -> Tuple[Tensor, Optional[Tensor]]:
        """[Wq; Wk; Wv] (3E, E) and [bq; bk; bv] (3E,) or None; cached when no gradient can flow."""
        lins = (self.query, self.key, self.value)
        weights = [lin.weight for lin in lins]
        biases = [lin.bias for lin in lins] if lins[0].bias is not None else []
        tensors = weights + biases
        if ((torch.is_grad_enabled() and any(p.requires_grad for p in tensors))
                or torch.compiler.is_compiling()  # compiled graphs fold the cat themselves
                or any(p.is_inference() for p in tensors)):  # no version counter to key on
            return torch.cat(weights), torch.cat(biases) if biases else None
        key = [(p.data_ptr(), p.dtype, p.device, tensor_version(p)) for p in tensors]
        cached = self.__dict__.get("_qkv_cache")
        if (cached is not None and cached[1] == key
                and all(ref() is p for ref, p in zip(cached[0], tensors))):
            return cached[2], cached[3]
        # a normal tensor even under inference_mode: it may later meet autograd (frozen weights,
        # input that requires grad), which refuses inference tensors
        with torch.inference_mode(False), torch.no_grad():
            w = torch.cat(weights)
            b = torch.cat(biases) if biases else None
        self.__dict__["_qkv_cache"] = ([weakref.ref(p) for p in tensors], key, w, b)
        return w, b

    def clear_qkv_cache(self) -> None:
        """Drop the cached fused Q/K/V weight (needed only after writes through ``.data``)."""
        self.__dict__.pop("_qkv_cache", None)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_qkv_cache", None)  # weak references do not pickle; a copy builds its own
        return state

    def _attention(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                   attn_bias: Optional[Tensor] = None) -> Tensor:
        """The self-attention's context (T, E), before its output dense; ``attn_bias`` a score
        bias at sequence-local positions (MPNet's relative positions, (1, H, L, L))."""
        t = x.shape[0]
        h, d = self.num_heads, self.head_dim
        lins = (self.query, self.key, self.value)
        if all(plain_linear(lin) for lin in lins) and len({lin.bias is None for lin in lins}) == 1:
            w, b = self._fused_qkv()
            qkv = F.linear(x, w, b).view(t, 3, h, d)  # [T, E] @ [E, 3E] -> [T, 3, H, D]
        else:
            qkv = torch.stack([lin(x) for lin in lins], dim=1).view(t, 3, h, d)
        q, k, v = qkv.unbind(dim=1)  # 3 x [T, H, D]
        # MPNet calls its Dropout on the probabilities (its own mode); the others hand its rate
        # to an attention function in transformers 5.x (the layer's mode)
        drop = self.attention_dropout
        p_attn = drop.p if (drop.training if self.attention_dropout_called else self.training) else 0.0
        return ops.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                    dropout_p=p_attn, scale=d ** -0.5, attn_mask=attn_bias,
                                    backend=self.backend).reshape(t, h * d)

    def _activation(self, x: Tensor) -> Tensor:
        """act(x @ W1^T + b1): one ``bias_gelu`` for a GELU, else the module's own activation."""
        approximate = gelu_approximation(self.activation)
        if approximate is not None and plain_linear(self.intermediate):
            return ops.bias_gelu(F.linear(x, self.intermediate.weight), self.intermediate.bias,
                                 approximate, backend=self.backend)
        return self.activation(self.intermediate(x))

    def _dense_add_norm(self, x: Tensor, dense: nn.Module, residual: Tensor, norm: nn.Module,
                        dropout: nn.Module, return_residual: bool = False):
        """norm(dropout(dense(x)) + residual), one ``add_layer_norm`` after the matmul where the
        modules run plainly (the Dropout in its own mode, as HuggingFace calls it)."""
        return add_norm(*matmul(x, dense), dropout, residual, norm, self.backend, return_residual)

    def forward(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                attn_bias: Optional[Tensor] = None) -> Tensor:
        ctx = self._attention(x, cu_seqlens, max_seqlen, attn_bias)
        a = self._dense_add_norm(ctx, self.attention_dense, x, self.attention_norm, self.hidden_dropout)
        return self._dense_add_norm(self._activation(a), self.output_dense, a, self.output_norm,
                                    self.output_dropout)


class PreLNBertLayer(BertLayer):
    """One pre-LayerNorm layer (XLM-RoBERTa-XL, RoBERTa-PreLayerNorm) on packed tokens, sharing the
    HuggingFace layer's modules. ``attention_norm`` is the LayerNorm before the self-attention,
    ``output_norm`` the one before the feed-forward.

    forward(x (T, E), normed (T, E), cu_seqlens, max_seqlen, next_norm) -> (x', next_norm(x'))::

        normed = attention_norm(x)                          (computed by the previous layer)
        ctx    = varlen_attention(normed @ [Wq; Wk; Wv]^T + b)
        n2, a  = add_layer_norm(ctx @ Wo^T, x, output_norm, input_bias=bo, dropout,
                                return_residual=True)       (a = x + dropout(ctx @ Wo^T + bo))
        h      = bias_gelu(n2 @ W1^T, b1)
        out, x' = add_layer_norm(h @ W2^T, a, next_norm, input_bias=b2, dropout,
                                 return_residual=True)      (x' = a + dropout(h @ W2^T + b2))

    ``next_norm`` is the next layer's ``attention_norm`` (the final LayerNorm after the last layer),
    so every LayerNorm of the model is fused into the residual add before it.
    """

    def forward(self, x: Tensor, normed: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                next_norm: nn.LayerNorm) -> Tuple[Tensor, Tensor]:
        ctx = self._attention(normed, cu_seqlens, max_seqlen)
        n2, a = self._dense_add_norm(ctx, self.attention_dense, x, self.output_norm, self.hidden_dropout,
                                     return_residual=True)
        out, x = self._dense_add_norm(self._activation(n2), self.output_dense, a, next_norm,
                                      self.output_dropout, return_residual=True)
        return x, out


def _albert_layers(base: nn.Module, stack: nn.Module) -> list:
    """ALBERT's layer sequence: layer i runs the inner layers of group
    ``i * num_hidden_groups // num_hidden_layers`` (shared weights, as transformers does)."""
    config = base.config
    n, groups = config.num_hidden_layers, config.num_hidden_groups
    return [inner for i in range(n) for inner in stack.albert_layer_groups[int(i / (n / groups))].albert_layers]


def _embed(embeddings: nn.Module, **inputs) -> Tensor:
    """Call a HuggingFace embeddings module with the inputs its forward takes: BERT's take
    token_type_ids and position_ids; DistilBERT's neither in transformers 4.x (which names
    inputs_embeds ``input_embeds``). A given input it does not take is an error; a forward taking
    ``**kwargs`` (a wrapper put in the embeddings' place) gets every given input by name."""
    names = inspect.signature(embeddings.forward).parameters
    if any(p.kind is p.VAR_KEYWORD for p in names.values()):
        return embeddings(**{k: v for k, v in inputs.items() if v is not None})
    call = {}
    for name, value in inputs.items():
        target = "input_embeds" if name == "inputs_embeds" and name not in names else name
        if target in names:
            call[target] = value
        elif value is not None:
            raise ValueError(f"{type(embeddings).__name__} takes no {name}")
    return embeddings(**call)


class BertEncoder(nn.Module, NoTorchScript):
    """Padding-free BERT encoder (embeddings + layers) built from a HuggingFace model.

    Build with :meth:`from_hf`. ``forward(input_ids, attention_mask, token_type_ids, position_ids,
    inputs_embeds)`` -> last hidden state (B, L, E): the HuggingFace embeddings run on the padded
    batch (they are cheap and model-specific: RoBERTa's padding-aware positions, ELECTRA's
    projection), then :func:`fastbert.unpad_input` packs the real tokens once, every layer runs
    on the packed (total, E) tokens with :func:`fastbert.varlen_attention` and the fused
    ``add_layer_norm`` / ``bias_gelu``, and :func:`fastbert.pad_input` scatters them back (padding
    positions are 0). Equal to the HuggingFace model's ``last_hidden_state`` on the real tokens.

    Pre-LayerNorm models (XLM-RoBERTa-XL, RoBERTa-PreLayerNorm) get :class:`PreLNBertLayer` layers
    and their final LayerNorm, each LayerNorm fused into the residual add before it. MPNet's
    relative-position bias is computed once per forward for positions 0 .. max_seqlen - 1,
    (1, H, L, L), and every layer's varlen attention reads it at each sequence's own positions
    (``attn_mask`` of :func:`fastbert.varlen_attention`; its gradient reaches the bias table);
    a padding mask with a gap inside a row is refused for MPNet (see :meth:`unsupported_mask`).

    Attributes: ``embeddings`` (the HuggingFace module), ``embeddings_project`` (ELECTRA's, or
    ALBERT's ``embedding_hidden_mapping_in``; else None), ``layers`` (:class:`BertLayer` or
    :class:`PreLNBertLayer` list), ``final_norm`` (a pre-LN model's LayerNorm after the last layer;
    else None), ``pooler`` (the HuggingFace pooler or None; not applied by forward), ``backend``.

    Training works (dropout in every place HuggingFace has it; gradients flow to the shared
    HuggingFace parameters). ``varlen_attention`` checks the sequence lengths on the host in eager
    mode; every layer gets the same ``cu_seqlens`` tensor, so that is one device sync per forward,
    not one per layer.
    """

    # the submodules of the HuggingFace base model that forward calls on the padded batch, as the
    # original calls them (fastbert.integrations.huggingface.PaddingFreeModel lets their hooks run)
    padded_submodules = ("embeddings",)

    def __init__(self, embeddings: nn.Module, layers, *, embeddings_project: Optional[nn.Module] = None,
                 pooler: Optional[nn.Module] = None, final_norm: Optional[nn.LayerNorm] = None,
                 relative_position: Optional[nn.Module] = None, backend: Optional[str] = None) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.embeddings_project = embeddings_project
        self.layers = nn.ModuleList(layers)
        pre_ln = [isinstance(layer, PreLNBertLayer) for layer in self.layers]
        if any(pre_ln) and not all(pre_ln):
            raise ValueError("BertEncoder: layers must be all post-LN BertLayer or all PreLNBertLayer")
        if any(pre_ln) and not isinstance(final_norm, nn.LayerNorm):
            raise ValueError("BertEncoder: pre-LN layers need final_norm, the LayerNorm after the last layer")
        self.final_norm = final_norm if any(pre_ln) else None
        # MPNet: its encoder computes the relative-position bias (compute_position_bias); kept
        # outside the module tree (it holds the layers), its bias table is a submodule here
        self.__dict__["_relative_position"] = relative_position
        self.relative_attention_bias = getattr(relative_position, "relative_attention_bias", None)
        self.pooler = pooler
        self.backend = check_backend(backend)

    @classmethod
    def from_hf(cls, hf_model: nn.Module, *, backend: Optional[str] = None) -> "BertEncoder":
        """Build the encoder on a HuggingFace BERT (``BertModel`` or any ``BertFor...``), RoBERTa,
        ELECTRA (and BERT's other copies), DistilBERT, ALBERT, MPNet, or pre-LayerNorm
        XLM-RoBERTa-XL or RoBERTa-PreLayerNorm model (transformers 4.57 or 5.x), sharing its
        modules and parameters.

        Refused with ValueError: decoders / cross-attention, relative position embeddings, models
        of other structure. Works on a model already passed through :func:`fastbert.optimize` too.
        The encoder starts in the model's train/eval mode; ``encoder.train()`` / ``.eval()`` also
        switch the shared embeddings module.
        """
        backend = check_backend(backend)
        base = getattr(hf_model, "base_model", hf_model)
        stack = getattr(base, "encoder", None)
        if stack is None:
            stack = getattr(base, "transformer", None)  # DistilBERT's
        hf_layers = _albert_layers(base, stack) if hasattr(stack, "albert_layer_groups") else getattr(
            stack, "layer", None)
        _require(isinstance(base, nn.Module) and hasattr(base, "embeddings") and hf_layers is not None,
                 f"{type(hf_model).__name__} is not a BERT-style model (embeddings + encoder.layer, "
                 "DistilBERT's transformer.layer or ALBERT's layer groups)")
        config = getattr(base, "config", None)
        _require(not getattr(config, "is_decoder", False), "decoder models are not supported")
        _require(not getattr(config, "add_cross_attention", False), "cross-attention is not supported")
        pos = getattr(config, "position_embedding_type", "absolute") or "absolute"
        _require(pos == "absolute", f"position_embedding_type={pos!r} is not supported")
        wrapped = {}  # ALBERT runs its shared layers several times: one BertLayer each
        layers = [wrapped.setdefault(id(layer), (PreLNBertLayer if _is_pre_ln(layer) else BertLayer)(
            layer, backend=backend)) for layer in hf_layers]
        project = getattr(base, "embeddings_project", None) or getattr(stack, "embedding_hidden_mapping_in",
                                                                      None)
        final_norm = None
        if any(isinstance(layer, PreLNBertLayer) for layer in layers):
            # XLM-RoBERTa-XL's encoder holds it; RoBERTa-PreLayerNorm's base model
            final_norm = getattr(stack, "LayerNorm", None)
            if final_norm is None:
                final_norm = getattr(base, "LayerNorm", None)
            _require(isinstance(final_norm, nn.LayerNorm), "a pre-LN model without its final LayerNorm")
        relative = stack if hasattr(stack, "compute_position_bias") else None  # MPNet's encoder
        encoder = cls(base.embeddings, layers, embeddings_project=project, final_norm=final_norm,
                      pooler=getattr(base, "pooler", None), relative_position=relative,
                      backend=backend)
        return set_own_mode(encoder, base.training)  # the HuggingFace model's mode (its modules' own)

    def relative_position_bias(self, max_seqlen: int, like: Tensor) -> Optional[Tensor]:
        """MPNet's relative-position score bias for positions 0 .. max_seqlen - 1, (1, H, L, L),
        computed by the HuggingFace encoder as it computes it (shared by every sequence: the
        kernels read it at each sequence's own positions); None for other models."""
        relative = self.__dict__.get("_relative_position")
        if relative is None:
            return None
        return relative.compute_position_bias(like.new_empty((1, max_seqlen, 0)))

    def unsupported_mask(self, attention_mask: Optional[Tensor]) -> Optional[str]:
        """Why this encoder cannot take ``attention_mask`` (None when it can). MPNet's relative
        positions count the padded slots between real tokens: a mask with a gap inside a row
        (real, padding, real) has no packed equivalent."""
        if self.__dict__.get("_relative_position") is None or attention_mask is None:
            return None
        return gap_refusal(attention_mask, "MPNet's relative positions")

    def forward_packed(self, hidden: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        """Run the layers on packed tokens: hidden (total, E), cu_seqlens (N + 1,) int32 (as from
        :func:`fastbert.unpad_input`), max_seqlen -> (total, E). Pre-LN models: the final LayerNorm
        included (as the HuggingFace model's ``last_hidden_state``)."""
        if self.final_norm is None:
            bias = self.relative_position_bias(max_seqlen, hidden)
            for layer in self.layers:
                hidden = layer(hidden, cu_seqlens, max_seqlen, bias)
            return hidden
        norms = [layer.attention_norm for layer in self.layers] + [self.final_norm]
        normed = layer_norm(hidden, norms[0], self.backend)
        for layer, next_norm in zip(self.layers, norms[1:]):
            hidden, normed = layer(hidden, normed, cu_seqlens, max_seqlen, next_norm)
        return normed

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                inputs_embeds: Optional[Tensor] = None, *, mask_checked: bool = False) -> Tensor:
        """input_ids (B, L) or inputs_embeds (B, L, E_emb); attention_mask (B, L), 1 = real token
        (default: all real) -> last hidden state (B, L, E), 0 at padded positions.
        ``mask_checked=True``: the caller has already had :meth:`unsupported_mask` accept the mask
        (it reads the mask on the host, so :class:`~fastbert.integrations.huggingface.PaddingFreeModel`
        asks once, not twice)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = _embed(self.embeddings, input_ids=input_ids, token_type_ids=token_type_ids,
                        position_ids=position_ids, inputs_embeds=inputs_embeds)
        if self.embeddings_project is not None:
            hidden = self.embeddings_project(hidden)
        b, length = hidden.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones((b, length), dtype=torch.bool, device=hidden.device)
        if not mask_checked:
            reason = self.unsupported_mask(attention_mask)
            if reason is not None:
                raise ValueError(f"BertEncoder: {reason}")
        packed, indices, cu_seqlens, max_seqlen = unpad_input(hidden, attention_mask)
        packed = self.forward_packed(packed, cu_seqlens, max_seqlen)
        return pad_input(packed, indices, b, length)
