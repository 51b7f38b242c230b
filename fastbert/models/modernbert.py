"""A padding-free ModernBERT encoder (transformers 5.x): remove the padding once, run every layer on
the packed real tokens, put the padding back at the end.

ModernBERT was designed to run unpadded (its reference implementation packs the batch for
FlashAttention's varlen kernels); transformers 5.x runs it padded, masking the padding in every
layer. This encoder computes only the real tokens: the embeddings on the packed token ids, then in
every layer::

    h    = attn_norm(x)                                    (layer 0: identity)
    q, k = rotary(Wqkv(h))                                 (positions as the HF model's)
    ctx  = varlen_attention(q, k, v, cu_seqlens, window)   (local layers: +-local_attention / 2)
    y, x = add_layer_norm(Wo(ctx), x, mlp_norm, return_residual=True)
    x    = x + Wo_mlp(geglu(Wi(y)))

and the final LayerNorm, on :func:`fastbert.varlen_attention`, :func:`fastbert.add_layer_norm`,
:func:`fastbert.geglu` and :func:`fastbert.layer_norm`.

Usage::

    hf = transformers.AutoModel.from_pretrained("answerdotai/ModernBERT-base")   # or a ...For... model
    enc = fastbert.models.ModernBertEncoder.from_hf(hf)
    hidden = enc(input_ids, attention_mask=attention_mask)   # (B, L, E), 0 at padding
    # == hf(input_ids, attention_mask=...).last_hidden_state on the real tokens

The encoder shares the HuggingFace model's modules and Parameter objects (nothing is copied).
"""
from __future__ import annotations

import sys
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from ..nn._fuse import add_norm, layer_norm
from ..nn._utils import NoTorchScript, check_backend, set_own_mode
from ..nn.gelu import gelu_approximation
from ..padding import gap_refusal, pad_input, unpad_input

__all__ = ["ModernBertEncoder", "ModernBertLayer"]


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"ModernBertEncoder.from_hf: {message}")


class ModernBertLayer(nn.Module, NoTorchScript):
    """One ModernBERT layer on packed tokens, sharing a HuggingFace ``ModernBertEncoderLayer``'s
    modules. forward(x (T, E), cu_seqlens (N + 1,) int32, max_seqlen, cos (T, D), sin (T, D))
    -> (T, E); ``cos`` / ``sin``: the rotary embedding of each token's position (this layer's type).
    """

    def __init__(self, hf_layer: nn.Module, rotary: Callable, *, backend: Optional[str] = None) -> None:
        super().__init__()
        attn, mlp = getattr(hf_layer, "attn", None), getattr(hf_layer, "mlp", None)
        _require(isinstance(attn, nn.Module) and isinstance(mlp, nn.Module),
                 f"expected attn and mlp submodules in {type(hf_layer).__name__}")
        # the Linears are called (a LoRA adapter in their place runs); the norms are fused where
        # they run plainly, else called (fastbert.nn._fuse)
        for owner, names in ((attn, ("Wqkv", "Wo", "out_drop")), (mlp, ("Wi", "Wo", "drop")),
                             (hf_layer, ("attn_norm", "mlp_norm"))):
            for n in names:
                _require(isinstance(getattr(owner, n, None), nn.Module),
                         f"expected a module {type(owner).__name__}.{n}")
        heads = getattr(getattr(attn, "config", None), "num_attention_heads", None)
        if heads is None:  # (from Wqkv's width)
            _require(isinstance(attn.Wqkv, nn.Linear), "expected config.num_attention_heads or a Linear Wqkv")
            heads = attn.Wqkv.out_features // (3 * int(attn.head_dim))
        self.attn_norm, self.mlp_norm = hf_layer.attn_norm, hf_layer.mlp_norm
        self.Wqkv, self.attn_out, self.attn_drop = attn.Wqkv, attn.Wo, attn.out_drop
        self.head_dim = int(attn.head_dim)
        self.num_heads = int(heads)
        # the probabilities' dropout rate is a float attribute of the attention module: read at
        # each call (a rate set on the model after from_hf applies), from a reference that is not
        # a submodule (its parameters are registered above, under this layer's names)
        _require(isinstance(getattr(attn, "attention_dropout", None), (int, float)),
                 f"expected {type(attn).__name__}.attention_dropout to be a number")
        self.__dict__["_hf_attention"] = attn
        window = attn.sliding_window  # transformers' inclusive bound: local_attention // 2 + 1
        self.window_size: Optional[Tuple[int, int]] = None if window is None else (window - 1, window - 1)
        self.attention_type = hf_layer.attention_type
        self.Wi, self.mlp_out, self.mlp_drop, self.act = mlp.Wi, mlp.Wo, mlp.drop, mlp.act
        self._rotary = rotary
        self.backend = backend

    @property
    def attention_dropout(self) -> float:
        """The attention probabilities' dropout rate: that of the HuggingFace attention module this
        layer was built from (one rate for both: setting it here sets it there; a module put in
        its place later is not followed, as for every module the layer shares)."""
        attn = self.__dict__.get("_hf_attention")
        if attn is None:  # pickled before the rate was shared (fastbert 0.1.0 until 2026-11-24): a copy
            return float(self.__dict__["attention_dropout"])
        return float(attn.attention_dropout)

    @attention_dropout.setter
    def attention_dropout(self, p: float) -> None:
        attn = self.__dict__.get("_hf_attention")
        if attn is None:
            self.__dict__["attention_dropout"] = float(p)
        else:
            attn.attention_dropout = p

    def forward(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int, cos: Tensor, sin: Tensor) -> Tensor:
        t, be = x.shape[0], self.backend
        qkv = self.Wqkv(layer_norm(x, self.attn_norm, be)).view(t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=1)  # 3 x (T, H, D)
        q, k = self._rotary(q, k, cos, sin, unsqueeze_dim=1)  # cos (T, D) -> (T, 1, D)
        p = self.attention_dropout if self.training else 0.0
        ctx = ops.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=p,
                                   scale=self.head_dim ** -0.5, window_size=self.window_size, backend=be)
        attn_out = self.attn_drop(self.attn_out(ctx.reshape(t, self.num_heads * ctx.shape[-1])))
        y, x = add_norm(attn_out, None, None, x, self.mlp_norm, be, return_residual=True)
        approximate = gelu_approximation(self.act)
        if approximate is None:
            a, gate = self.Wi(y).chunk(2, dim=-1)
            act = self.act(a) * gate
        else:
            act = ops.geglu(self.Wi(y), None, approximate, backend=be)
        return x + self.mlp_out(self.mlp_drop(act))


class ModernBertEncoder(nn.Module, NoTorchScript):
    """Padding-free ModernBERT encoder (embeddings + layers + final norm) built from a transformers
    5.x ``ModernBertModel`` or ``ModernBertFor...`` model with :meth:`from_hf`.

    ``forward(input_ids, attention_mask, position_ids, inputs_embeds)`` -> last hidden state
    (B, L, E), 0 at padding: :func:`fastbert.unpad_input` packs the real tokens' ids (or
    embeddings) once, the embeddings, every layer and the final norm run on them, and
    :func:`fastbert.pad_input` scatters the result back. Positions are the HuggingFace model's
    (``position_ids``, default ``arange(L)``), so the rotary embeddings match it; the local layers'
    window counts packed tokens, which equals transformers' window whenever each sequence's real
    tokens are contiguous (right or left padding): a mask with a gap inside a row (real, padding,
    real) is refused (:meth:`unsupported_mask`) when a layer has a window. Training works (the
    model's dropouts; gradients reach the shared parameters).
    """

    def __init__(self, embeddings: nn.Module, layers: List[ModernBertLayer], final_norm: nn.Module,
                 rotary_emb: nn.Module, *, backend: Optional[str] = None) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.layers = nn.ModuleList(layers)
        self.final_norm = final_norm
        self.rotary_emb = rotary_emb
        self.backend = check_backend(backend)

    @classmethod
    def from_hf(cls, hf_model: nn.Module, *, backend: Optional[str] = None) -> "ModernBertEncoder":
        """Build the encoder on a transformers 5.x ModernBERT model, sharing its modules and
        parameters (also after :func:`fastbert.optimize`). Refused with ValueError: other models,
        transformers 4.x's ModernBERT (another layer structure)."""
        backend = check_backend(backend)
        base = getattr(hf_model, "base_model", hf_model)
        _require(all(hasattr(base, n) for n in ("embeddings", "layers", "final_norm", "rotary_emb")),
                 f"{type(hf_model).__name__} is not a transformers 5.x ModernBERT model (embeddings, "
                 "layers, final_norm and rotary_emb)")
        _require(isinstance(base.final_norm, nn.LayerNorm), "expected a LayerNorm final_norm")
        layers = []
        for layer in base.layers:
            rotary = getattr(sys.modules.get(type(layer).__module__), "apply_rotary_pos_emb", None)
            if rotary is None:  # after fastbert.optimize: the swapped layer keeps transformers'
                rotary = getattr(layer.attn, "_fastbert_rotary", None)
            _require(callable(rotary) and hasattr(layer, "attention_type"),
                     "expected transformers 5.x ModernBERT layers (apply_rotary_pos_emb, attention_type)")
            layers.append(ModernBertLayer(layer, rotary, backend=backend))
        encoder = cls(base.embeddings, layers, base.final_norm, base.rotary_emb, backend=backend)
        return set_own_mode(encoder, base.training)  # the HuggingFace model's mode (its modules' own)

    def forward_packed(self, hidden: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                       position_ids: Tensor) -> Tensor:
        """The layers and the final norm on packed tokens: hidden (T, E) (after the embeddings),
        cu_seqlens (N + 1,) int32, max_seqlen, position_ids (T,) each token's position -> (T, E)."""
        rotary = {}
        for t in sorted({layer.attention_type for layer in self.layers}):
            cos, sin = self.rotary_emb(hidden[None], position_ids[None], t)
            rotary[t] = (cos[0], sin[0])
        for layer in self.layers:
            hidden = layer(hidden, cu_seqlens, max_seqlen, *rotary[layer.attention_type])
        return layer_norm(hidden, self.final_norm, self.backend)

    def unsupported_mask(self, attention_mask: Optional[Tensor]) -> Optional[str]:
        """Why this encoder cannot take ``attention_mask`` (None when it can): the local layers'
        window counts padded positions in transformers, packed tokens here, so a row with padding
        between two real tokens has no packed equivalent. Not checked under torch.compile or
        CUDA-graph capture (no host read there)."""
        if attention_mask is None or all(layer.window_size is None for layer in self.layers):
            return None
        return gap_refusal(attention_mask, "the local layers' window")

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None, *,
                mask_checked: bool = False) -> Tensor:
        """input_ids (B, L) or inputs_embeds (B, L, E); attention_mask (B, L), 1 = real token
        (default: all real); position_ids (B, L) or (1, L) (default: arange(L)) -> last hidden
        state (B, L, E), 0 at padded positions. ``mask_checked=True``: the caller has already had
        :meth:`unsupported_mask` accept the mask (a host read)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        src = input_ids if input_ids is not None else inputs_embeds
        b, length = src.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones((b, length), dtype=torch.bool, device=src.device)
        elif not mask_checked:
            reason = self.unsupported_mask(attention_mask)
            if reason is not None:
                raise ValueError(f"ModernBertEncoder: {reason}")
        if position_ids is None:
            position_ids = torch.arange(length, device=src.device)[None]
        position_ids = position_ids.expand(b, length)
        if input_ids is not None:
            ids, indices, cu_seqlens, max_seqlen = unpad_input(input_ids[..., None], attention_mask)
            hidden = self.embeddings(input_ids=ids.view(1, -1))[0]
        else:
            embeds, indices, cu_seqlens, max_seqlen = unpad_input(inputs_embeds, attention_mask)
            hidden = self.embeddings(inputs_embeds=embeds[None])[0]
        positions = position_ids.reshape(-1)[indices]
        hidden = self.forward_packed(hidden, cu_seqlens, max_seqlen, positions)
        return pad_input(hidden, indices, b, length)
