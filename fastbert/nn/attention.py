"""``fastbert.nn.MultiheadAttention``: ``torch.nn.MultiheadAttention`` on
:func:`fastbert.scaled_dot_product_attention`, and the explicit attention path that also returns
the attention weights (used by every fastbert module when weights are asked for)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops, reference
from .._validation import check_dropout, type_name
from ._utils import (NoTorchScript, adopt, check_backend, check_factory_dtype, check_input, check_positive_int,
                     check_torch_computation, compute_dtype)

__all__ = ["MultiheadAttention", "attention_with_weights"]


def attention_with_weights(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    head_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Attention written out with plain torch ops, returning the output and the weights.

    The same math and mask semantics as :func:`fastbert.reference.scaled_dot_product_attention`
    (bool mask True = take part, float mask added, a fully masked row gives 0 weights and output),
    computed in fp32 (fp64 for fp64 inputs). Dropout, when ``dropout_p > 0``, is torch's
    ``F.dropout`` on the weights; ``head_mask`` (broadcastable to the weights, e.g. (1, H, 1, 1))
    multiplies the weights after dropout, as HuggingFace models do.

    Shapes: query (B, H, Lq, D), key (B, H, Lk, D), value (B, H, Lk, Dv) ->
    (out (B, H, Lq, Dv), weights (B, H, Lq, Lk)), both in the dtype of ``query``.
    """
    cdt = compute_dtype(query)
    if key.shape[-2] == 0:  # no key: every row is fully masked, zero weights and output
        probs = query.new_zeros(query.shape[:-1] + (0,), dtype=cdt)
        out = query.new_zeros(query.shape[:-1] + (value.shape[-1],))
        return out + 0.0 * (query.sum() + key.sum() + value.sum()), probs.to(query.dtype)
    probs = reference.attention_probs(query, key, attn_mask, is_causal, scale, compute_dtype=cdt)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    if head_mask is not None:
        probs = probs * head_mask.to(cdt)
    out = torch.matmul(probs, value.to(cdt))  # [B, H, Lq, Lk] @ [B, H, Lk, Dv] -> [B, H, Lq, Dv]
    return out.to(query.dtype), probs.to(query.dtype)


def _check_mask_dtype(name: str, mask: Optional[Tensor]) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type_name(mask)}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"only bool and floating types of {name} are supported, got {mask.dtype}")


def _to_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """torch's convention -> additive float: bool True (= do not attend) becomes -inf."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def merge_masks(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], batch: int,
                heads: int, lq: int, lk: int, dtype: torch.dtype) -> Optional[Tensor]:
    """Combine ``nn.MultiheadAttention``-style masks into one fastbert (SDPA-convention) mask.

    Inputs use torch.nn's convention: bool True = do NOT attend, float = added. ``attn_mask`` is
    (Lq, Lk) or (B * H, Lq, Lk); ``key_padding_mask`` is (B, Lk). Returns None, a bool mask
    (True = take part) when both are bool, or an additive float mask of ``dtype``; broadcastable
    to (B, H, Lq, Lk).
    """
    masks = []
    if attn_mask is not None:
        masks.append(attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(batch, heads, lq, lk))
    if key_padding_mask is not None:
        masks.append(key_padding_mask.reshape(batch, 1, 1, lk))
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        # each inverted at its own size, then one (B, H | 1, Lq, Lk) result (not a full-size `|`
        # and a full-size `~`)
        keep = [~m for m in masks]
        return keep[0] if len(keep) == 1 else keep[0] & keep[1]
    out = _to_additive(masks[0], dtype)
    if len(masks) == 2:
        out = out + _to_additive(masks[1], dtype)
    return out


def linear_any_layout(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                      chunks: int = 1) -> Tuple[Tensor, ...]:
    """``F.linear(x, weight, bias).chunk(chunks, dim=-1)`` without the copies F.linear makes of a
    batch-first (N, L, E) view of a sequence-first (L, N, E) tensor (torch's default layout), in
    the forward and for the gradient: the product is taken and split in the sequence-first layout,
    and each piece returned as a batch-first view."""
    if x.dim() == 3 and x.shape[0] > 1 and not x.is_contiguous() and x.transpose(0, 1).is_contiguous():
        return tuple(y.transpose(0, 1) for y in F.linear(x.transpose(0, 1), weight, bias).chunk(chunks, dim=-1))
    return F.linear(x, weight, bias).chunk(chunks, dim=-1)


class MultiheadAttention(nn.MultiheadAttention, NoTorchScript):
    """Drop-in for :class:`torch.nn.MultiheadAttention` running :func:`fastbert.scaled_dot_product_attention`.

    Same constructor (embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
    add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None, dtype=None) plus a
    keyword-only ``backend``; same parameters (``in_proj_weight``/``in_proj_bias``, or
    ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when kdim/vdim differ from embed_dim,
    ``out_proj``, ``bias_k``/``bias_v``), initialisation and ``state_dict`` — it is a subclass, so a
    torch checkpoint loads as is. ``add_bias_kv`` and ``add_zero_attn`` are supported.

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (attn_output, attn_weights or None), with
    torch's shapes and mask semantics:

    * query (L, N, E) or (N, L, E) with ``batch_first``, key (S, N, kdim), value (S, N, vdim);
      unbatched (L, E), (S, kdim), (S, vdim). Output (L, N, E) / (N, L, E) / (L, E).
    * ``key_padding_mask`` (N, S) or (S,): bool True = padding (do not attend), or float added.
    * ``attn_mask`` (L, S) or (N * num_heads, L, S): bool True = do not attend, or float added.
      (The opposite of SDPA's bool convention.)
    * ``is_causal`` is a hint that ``attn_mask`` is the causal mask; as in torch, ``attn_mask`` is
      required with it, and the hint is used (and the mask ignored) only when there is no
      ``key_padding_mask`` and ``need_weights`` is False.
    * ``need_weights=True`` returns the weights (N, L, S) averaged over heads, or (N, H, L, S) with
      ``average_attn_weights=False``. They are computed through the explicit reference path
      (:func:`attention_with_weights`, plain torch ops, not the fused kernels), which then also
      produces the output: pass ``need_weights=False`` for speed, as torch recommends.

    Difference from torch: a query whose every key is masked gets zero weights and a zero attention
    output, so ``out_proj``'s bias as its output, where torch gives NaN. Shape errors raise ValueError naming the argument (torch: AssertionError).

    Inside ``torch.nn.TransformerEncoderLayer`` in eval mode with autograd off, torch's fused
    fast path reads ``in_proj_weight``/``out_proj`` directly and never calls this forward (the
    result is the same); use :class:`fastbert.nn.TransformerEncoderLayer` or
    :func:`fastbert.optimize` to run the whole layer on fastbert.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None, *,
                 backend: Optional[str] = None) -> None:
        # Checked here with clear errors (torch asserts, or fails inside torch.empty, on some).
        embed_dim = check_positive_int("embed_dim", embed_dim)
        num_heads = check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        dropout = check_dropout(dropout, "dropout")
        kdim = None if kdim is None else check_positive_int("kdim", kdim)
        vdim = None if vdim is None else check_positive_int("vdim", vdim)
        check_factory_dtype(dtype)
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.backend = check_backend(backend)

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention, *,
                   backend: Optional[str] = None) -> "MultiheadAttention":
        """A fastbert MultiheadAttention sharing every Parameter object of ``module``."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"module must be a torch.nn.MultiheadAttention, got {type(module).__name__}")
        check_torch_computation(module, nn.MultiheadAttention, cls)
        return adopt(cls, module, backend=check_backend(backend))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}, backend={self.backend!r}")

    # ------------------------------------------------------------------------------------------
    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        weight = self.in_proj_weight if self._qkv_same_embed_dim else self.q_proj_weight
        for name, t in (("query", query), ("key", key), ("value", value)):
            check_input(name, t, weight)
        _check_mask_dtype("key_padding_mask", key_padding_mask)
        _check_mask_dtype("attn_mask", attn_mask)
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is not None and m.device != query.device:
                raise ValueError(f"{name} is on {m.device} but query is on {query.device}")
        if query.dim() == 3:
            batched = True
        elif query.dim() == 2:
            batched = False
        else:
            raise ValueError(f"query should be unbatched 2D or batched 3D tensor but received "
                             f"{query.dim()}-D query tensor")
        want = 3 if batched else 2
        for name, t in (("key", key), ("value", value)):
            if t.dim() != want:
                raise ValueError(f"for {'batched' if batched else 'unbatched'} (query.dim() = "
                                 f"{query.dim()}) query, {name} must be {want}-D, got shape "
                                 f"{tuple(t.shape)}")
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"query's last dim must be embed_dim = {self.embed_dim}, got shape "
                             f"{tuple(query.shape)}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(f"key and value must end in kdim = {self.kdim} and vdim = {self.vdim}, "
                             f"got shapes {tuple(key.shape)} and {tuple(value.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree in "
                             "all but the last dim")
        if batched:
            bdim = 0 if self.batch_first else 1
            n, lq, s = query.shape[bdim], query.shape[1 - bdim], key.shape[1 - bdim]
            if key.shape[bdim] != n:
                raise ValueError(f"query and key must have the same batch size, got shapes "
                                 f"{tuple(query.shape)} and {tuple(key.shape)} "
                                 f"(batch_first={self.batch_first})")
        else:
            n, lq, s = 1, query.shape[0], key.shape[0]
        if key_padding_mask is not None:
            want_kpm = (n, s) if batched else (s,)
            if tuple(key_padding_mask.shape) != want_kpm:
                raise ValueError(f"key_padding_mask must have shape {want_kpm}, got "
                                 f"{tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            ok2 = (lq, s)
            ok3 = (n * self.num_heads, lq, s)
            if attn_mask.dim() == 2 and tuple(attn_mask.shape) != ok2:
                raise ValueError(f"the 2-D attn_mask must have shape (L, S) = {ok2}, got "
                                 f"{tuple(attn_mask.shape)}")
            if attn_mask.dim() == 3 and tuple(attn_mask.shape) != ok3:
                raise ValueError(f"the 3-D attn_mask must have shape (N * num_heads, L, S) = {ok3}, "
                                 f"got {tuple(attn_mask.shape)}")
            if attn_mask.dim() not in (2, 3):
                raise ValueError(f"attn_mask must be 2-D (L, S) or 3-D (N * num_heads, L, S), got "
                                 f"shape {tuple(attn_mask.shape)}")
        return batched

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        same_qkv = query is key and key is value
        same_kv = key is value
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        ctx, weights = self.attend(query, key, value, key_padding_mask=key_padding_mask,
                                   attn_mask=attn_mask, need_weights=need_weights,
                                   is_causal=is_causal, same_qkv=same_qkv, same_kv=same_kv)
        out, = linear_any_layout(ctx, self.out_proj.weight, self.out_proj.bias)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(0)
            if weights is not None:
                weights = weights.squeeze(0)
        elif not self.batch_first:
            # (L, N, E) contiguous, as torch's: free when the context came back sequence-first (the
            # Triton kernels); a copy when it is batch-first (need_weights, the torch backend)
            out = out.transpose(0, 1).contiguous()
        return out, weights

    def packed_unsupported(self) -> Optional[str]:
        """Why :meth:`attend_packed` cannot run this module (None when it can)."""
        if self.bias_k is not None or self.bias_v is not None:
            return "bias_k / bias_v add a key to every sequence"
        if self.add_zero_attn:
            return "add_zero_attn adds a key to every sequence"
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            return "kdim / vdim differ from embed_dim (not a self-attention)"
        return None

    def attend_packed(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int, *,
                      is_causal: bool = False) -> Tensor:
        """Self-attention of packed sequences (no padding), everything but the output projection.

        Shapes: x (T, E), the real tokens of N sequences back to back; cu_seqlens (N + 1,) int32
        (as from :func:`fastbert.unpad_input`) -> context (T, E) before ``out_proj``. Each token
        attends to the tokens of its own sequence (``is_causal``: to those at or before it), through
        :func:`fastbert.varlen_attention` with this module's dropout in training mode.
        """
        reason = self.packed_unsupported()
        if reason is not None:
            raise NotImplementedError(f"MultiheadAttention.attend_packed: {reason}")
        t, e = x.shape
        h, d = self.num_heads, self.head_dim
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [T, E] @ [E, 3E] -> [T, 3E]
        q, k, v = qkv.view(t, 3, h, d).unbind(dim=1)  # 3 x [T, H, D]
        dropout_p = self.dropout if self.training else 0.0
        ctx = ops.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                   dropout_p=dropout_p, is_causal=is_causal, backend=self.backend)
        return ctx.reshape(t, e)

    def attend(self, query: Tensor, key: Tensor, value: Tensor, *,
               key_padding_mask: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
               need_weights: bool = False, is_causal: bool = False, same_qkv: Optional[bool] = None,
               same_kv: Optional[bool] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """Everything but the output projection, on batch-first inputs.

        Shapes: query (N, L, E), key (N, S, kdim), value (N, S, vdim), masks as in :meth:`forward`
        (batched) -> (context (N, L, E) before ``out_proj``, weights (N, H, L, S') or None), where S'
        counts the extra bias_k / zero-attention keys. Inputs that are ``transpose(0, 1)`` views of
        sequence-first (L, N, E) tensors are not copied; with the Triton kernels (and no weights)
        the context is then such a view too. :class:`fastbert.nn.TransformerEncoderLayer`
        uses it to fuse ``out_proj``'s bias into the residual + LayerNorm.
        """
        if same_qkv is None:
            same_qkv = query is key and key is value
        if same_kv is None:
            same_kv = key is value
        n, lq, e = query.shape
        h, d = self.num_heads, self.head_dim
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the "
                               "Transformer module method `generate_square_subsequent_mask` to "
                               "create this mask.")
        use_causal_hint = is_causal and key_padding_mask is None and not need_weights
        if use_causal_hint:
            attn_mask = None

        # Input projections; the self-attention case runs one matmul on the packed weight.
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        # (a view of a sequence-first input is projected in that layout: no copy; q, k, v are then
        # views the kernels read through their strides, and the context comes back sequence-first)
        linear = linear_any_layout
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if same_qkv:
                q, k, v = linear(query, w, b, 3)  # [N, L, 3E] -> 3 x [N, L, E]
            elif same_kv:
                q, = linear(query, w[:e], bq)
                k, v = linear(key, w[e:], None if b is None else b[e:], 2)
            else:
                wq, wk, wv = w.chunk(3)
                (q,), (k,), (v,) = linear(query, wq, bq), linear(key, wk, bk), linear(value, wv, bv)
        else:
            (q,), (k,), (v,) = (linear(query, self.q_proj_weight, bq),
                                linear(key, self.k_proj_weight, bk),
                                linear(value, self.v_proj_weight, bv))

        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(n, 1, e)], dim=1)
            v = torch.cat([v, self.bias_v.expand(n, 1, e)], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        s = k.shape[1]
        q = q.view(n, lq, h, d).transpose(1, 2)  # [N, H, L, D]
        k = k.view(n, s, h, d).transpose(1, 2)   # [N, H, S, D]
        v = v.view(n, s, h, d).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros((n, h, 1, d))], dim=2)
            v = torch.cat([v, v.new_zeros((n, h, 1, d))], dim=2)
            s += 1
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))

        mask = merge_masks(attn_mask, key_padding_mask, n, h, lq, s, q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            out, weights = attention_with_weights(q, k, v, mask, dropout_p, is_causal=False)
        else:
            out = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                   is_causal=use_causal_hint, backend=self.backend)
            weights = None
        ctx = out.transpose(1, 2).reshape(n, lq, e)  # [N, H, L, D] -> [N, L, E]
        return ctx, weights
