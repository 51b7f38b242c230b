"""``fastbert.nn.TransformerEncoderLayer``: ``torch.nn.TransformerEncoderLayer`` with the output
sublayers fused (out-projection bias + dropout + residual + LayerNorm in one
:func:`fastbert.add_layer_norm`, linear1's bias + GELU in one :func:`fastbert.bias_gelu`); and
``fastbert.nn.TransformerEncoder``: ``torch.nn.TransformerEncoder`` computing only the real tokens
of a padded batch."""
from __future__ import annotations

import copy
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..padding import pad_input, unpad_input
from .._validation import check_dropout, host_checks_allowed, type_name
from ._fuse import add_norm, layer_norm, matmul, unfused_dropout
from ._utils import (NoTorchScript, adopt, check_backend, check_input, check_positive_int, check_torch_computation,
                     plain_linear, runs_plainly)
from .attention import MultiheadAttention, _check_mask_dtype
from .gelu import gelu_approximation
from .layer_norm import LayerNorm

__all__ = ["TransformerEncoder", "TransformerEncoderLayer"]


def _activation_fn(activation: Union[str, Callable[[Tensor], Tensor]]) -> Callable[[Tensor], Tensor]:
    if isinstance(activation, str):
        if activation == "relu":
            return F.relu
        if activation == "gelu":
            return F.gelu
        raise RuntimeError(f"activation should be relu/gelu, not {activation}")
    if not callable(activation):
        raise TypeError(f"activation must be 'relu', 'gelu' or a callable, got {type_name(activation)}")
    return activation


class TransformerEncoderLayer(nn.Module, NoTorchScript):
    """Drop-in for :class:`torch.nn.TransformerEncoderLayer`.

    Same constructor (d_model, nhead, dim_feedforward=2048, dropout=0.1, activation=relu,
    layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True, device, dtype) plus a
    keyword-only ``backend``; same submodule names and ``state_dict`` keys (``self_attn.*``,
    ``linear1``, ``linear2``, ``norm1``, ``norm2``), so torch checkpoints load as is; same forward
    ``(src, src_mask=None, src_key_padding_mask=None, is_causal=False)`` and mask semantics as
    :class:`fastbert.nn.MultiheadAttention` (bool True = do not attend, float added).

    Shapes: src (S, N, E), or (N, S, E) with ``batch_first``, or unbatched (S, E) -> same shape.

    What runs (fastbert ops, ``backend`` passed through):

    * post-norm (default): ``x = add_layer_norm(attn(x) @ Wo, x, norm1, input_bias=bo,
      dropout=dropout1)``, then ``x = add_layer_norm(ff(x) @ W2, x, norm2, input_bias=b2,
      dropout=dropout2)``;
    * pre-norm (``norm_first``): ``layer_norm`` for norm1, then one ``add_layer_norm(...,
      return_residual=True)`` gives both the new residual stream and norm2 of it;
    * the feed-forward's first bias and GELU run as one ``bias_gelu`` (any other activation is
      applied as given, after ``linear1``).

    A sublayer is fused only where it runs plainly (an ``nn.Linear`` / ``nn.LayerNorm`` /
    ``nn.Dropout`` of exactly that class, without hooks or an instance ``forward``); anything else
    in its place (a LoRA adapter, a pruned or hooked module, a subclass) is called as torch's layer
    calls it, and so is a ``self_attn`` with hooks. Each Dropout acts in its own training mode, as
    when called (Monte-Carlo dropout works). ``from_torch`` refuses a ``self_attn`` that is not
    exactly ``nn.MultiheadAttention``.

    It does not accept nested tensors; :func:`fastbert.optimize` turns off
    ``torch.nn.TransformerEncoder``'s nested-tensor fast path when it swaps its layers.
    """

    __constants__ = ["norm_first"]

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = F.relu,
                 layer_norm_eps: float = 1e-5, batch_first: bool = False, norm_first: bool = False,
                 bias: bool = True, device=None, dtype=None, *, backend: Optional[str] = None) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        backend = check_backend(backend)
        dim_feedforward = check_positive_int("dim_feedforward", dim_feedforward)
        dropout = check_dropout(dropout, "dropout")
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                            batch_first=batch_first, backend=backend, **factory)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, backend=backend, **factory)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, backend=backend, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        activation = _activation_fn(activation)
        # Kept for code that reads it (torch's TransformerEncoder does): 1 relu, 2 gelu, 0 other.
        if activation is F.relu or isinstance(activation, nn.ReLU):
            self.activation_relu_or_gelu = 1
        elif activation is F.gelu or isinstance(activation, nn.GELU):
            self.activation_relu_or_gelu = 2
        else:
            self.activation_relu_or_gelu = 0
        self.activation = activation
        self.backend = backend

    @classmethod
    def from_torch(cls, module: nn.TransformerEncoderLayer, *,
                   backend: Optional[str] = None) -> "TransformerEncoderLayer":
        """A fastbert layer sharing every Parameter (and submodule but ``self_attn``) of ``module``;
        ``self_attn`` becomes a :class:`fastbert.nn.MultiheadAttention` on the same parameters."""
        if not isinstance(module, nn.TransformerEncoderLayer):
            raise TypeError(f"module must be a torch.nn.TransformerEncoderLayer, got "
                            f"{type(module).__name__}")
        check_torch_computation(module, nn.TransformerEncoderLayer, cls,
                                ("forward", "_sa_block", "_ff_block"))
        reason = self_attn_refusal(module)
        if reason is not None:
            raise TypeError(f"module.self_attn {reason}")
        backend = check_backend(backend)
        new = adopt(cls, module, backend=backend)
        new.self_attn = MultiheadAttention.from_torch(module.self_attn, backend=backend)
        return new

    def extra_repr(self) -> str:
        return f"norm_first={self.norm_first}, backend={self.backend!r}"

    # ------------------------------------------------------------------------------------------
    def _feed_forward(self, x: Tensor):
        """(dropout(activation(linear1(x))) @ W2^T, linear2's bias) for the caller to fuse the bias;
        (linear2(...), None) when linear2 is not a plain Linear (see :func:`runs_plainly`)."""
        approximate = gelu_approximation(self.activation)
        if approximate is not None and plain_linear(self.linear1):
            h = ops.bias_gelu(F.linear(x, self.linear1.weight), self.linear1.bias, approximate,
                              backend=self.backend)
        else:
            h = self.activation(self.linear1(x))
        return matmul(self.dropout(h), self.linear2)

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if not isinstance(src, Tensor):
            raise TypeError(f"src must be a torch.Tensor, got {type_name(src)}")
        if src.is_nested:
            raise NotImplementedError("fastbert.nn.TransformerEncoderLayer does not take nested "
                                      "tensors; pass a padded batch with src_key_padding_mask")
        if src.dim() not in (2, 3):
            raise ValueError(f"src must be (S, N, E), (N, S, E) with batch_first, or unbatched "
                             f"(S, E); got shape {tuple(src.shape)}")
        e = self.self_attn.embed_dim
        if src.shape[-1] != e:
            raise ValueError(f"src must end in d_model = {e}, got shape {tuple(src.shape)}")
        check_input("src", src, self.self_attn.out_proj.weight)
        _check_mask_dtype("src_mask", src_mask)
        _check_mask_dtype("src_key_padding_mask", src_key_padding_mask)
        for name, m in (("src_mask", src_mask), ("src_key_padding_mask", src_key_padding_mask)):
            if m is not None and m.device != src.device:
                raise ValueError(f"{name} is on {m.device} but src is on {src.device}")
        batched = src.dim() == 3
        # x stays in the input's layout (sequence-first (S, N, E) is torch's default): the norms and
        # the feed-forward work on rows, and only the attention sees a batch-first view
        seq_first = not self.self_attn.batch_first
        x = src if batched else src.unsqueeze(1 if seq_first else 0)
        if not batched and src_key_padding_mask is not None:
            if src_key_padding_mask.dim() != 1:
                raise ValueError(f"for unbatched src, src_key_padding_mask must be 1-D (S,), got "
                                 f"shape {tuple(src_key_padding_mask.shape)}")
            src_key_padding_mask = src_key_padding_mask.unsqueeze(0)
        n, s = (x.shape[1], x.shape[0]) if seq_first else (x.shape[0], x.shape[1])
        if src_key_padding_mask is not None and tuple(src_key_padding_mask.shape) != (n, s):
            raise ValueError(f"src_key_padding_mask must have shape (N, S) = ({n}, {s}), got "
                             f"{tuple(src_key_padding_mask.shape)}")
        if src_mask is not None:
            h = self.self_attn.num_heads
            if src_mask.dim() not in (2, 3) or tuple(src_mask.shape[-2:]) != (s, s) or (
                    src_mask.dim() == 3 and src_mask.shape[0] != n * h):
                raise ValueError(f"src_mask must have shape (S, S) = ({s}, {s}) or (N * nhead, S, S) = "
                                 f"({n * h}, {s}, {s}), got {tuple(src_mask.shape)}")
        attn = self.self_attn

        def attend(h: Tensor):
            if runs_plainly(attn, type(attn)):
                hb = h.transpose(0, 1) if seq_first else h  # (N, S, E)
                ctx = attn.attend(hb, hb, hb, key_padding_mask=src_key_padding_mask,
                                  attn_mask=src_mask, is_causal=is_causal, same_qkv=True)[0]
                return self._out_proj(ctx.transpose(0, 1) if seq_first else ctx)
            # hooks or a forward replaced on self_attn's instance: called, as torch's layer calls it
            return attn(h, h, h, key_padding_mask=src_key_padding_mask, attn_mask=src_mask,
                        need_weights=False, is_causal=is_causal)[0], None

        x = self._sublayers(x, attend)
        return x if batched else x.squeeze(1 if seq_first else 0)

    def forward_packed(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int, is_causal: bool = False) -> Tensor:
        """The layer on packed sequences (no padding): x (T, E), the real tokens of N sequences back
        to back, cu_seqlens (N + 1,) int32, max_seqlen (as from :func:`fastbert.unpad_input`) ->
        (T, E). Attention through :func:`fastbert.varlen_attention`; ``is_causal``: each token sees
        the tokens of its sequence at or before it. Used by :class:`TransformerEncoder`."""
        return self._sublayers(x, lambda h: self._out_proj(
            self.self_attn.attend_packed(h, cu_seqlens, max_seqlen, is_causal=is_causal)))

    def _sublayers(self, x: Tensor, attend: Callable) -> Tensor:
        """Both sublayers on x (..., E), ``attend(h)`` giving the attention output before out_proj's
        bias and that bias (None when it is included). Each Linear / LayerNorm / Dropout is fused
        where it runs plainly, else called as torch's layer calls it (see :mod:`fastbert.nn._fuse`)."""
        if self.norm_first:
            h = layer_norm(x, self.norm1, self.backend)
            # y = norm2(x1) and x1 = x + dropout1(out_proj(ctx)), fused where plain.
            y, x = add_norm(*attend(h), self.dropout1, x, self.norm2, self.backend, return_residual=True)
            return x + unfused_dropout(*self._feed_forward(y), self.dropout2)
        x = add_norm(*attend(x), self.dropout1, x, self.norm1, self.backend)
        return add_norm(*self._feed_forward(x), self.dropout2, x, self.norm2, self.backend)

    def _out_proj(self, ctx: Tensor):
        """(ctx @ Wo^T, bo): out_proj's parameters are read, never the module called, as torch's
        MultiheadAttention does (F.multi_head_attention_forward takes its weight and bias)."""
        out_proj = self.self_attn.out_proj
        return F.linear(ctx, out_proj.weight), out_proj.bias


def self_attn_refusal(layer: nn.Module) -> Optional[str]:
    """Why the ``self_attn`` of a torch.nn.TransformerEncoderLayer cannot become a
    :class:`fastbert.nn.MultiheadAttention` (None when it can): the fastbert layer computes
    multi-head attention from its parameters, which a subclass's forward may not."""
    attn = layer.self_attn
    if type(attn) in (nn.MultiheadAttention, MultiheadAttention):
        return None
    return (f"is a {type_name(attn)}, not torch.nn.MultiheadAttention: its forward may compute "
            "something else than the multi-head attention fastbert's layer would compute")


def _padding_only(mask: Tensor) -> Optional[Tensor]:
    """A key padding mask (True = padded, or float: -inf = padded, 0 = real) as a bool mask of
    the real tokens; None when a float mask holds other values (a bias, not padding)."""
    if mask.dtype == torch.bool:
        return ~mask
    if not host_checks_allowed(mask.device):
        return None  # under torch.compile its values cannot be read: the padded path, one graph
    pad = torch.isneginf(mask)
    if not bool(((mask == 0) | pad).all()):  # one host sync; unpad_input syncs anyway
        return None
    return ~pad


def _is_causal_mask(mask: Tensor, s: int) -> bool:
    """Whether a 2-D ``mask`` is the square causal mask: bool True (float -inf) above the diagonal,
    False (0) elsewhere, as ``torch.nn.Transformer.generate_square_subsequent_mask`` makes."""
    if mask.dim() != 2 or tuple(mask.shape) != (s, s) or not host_checks_allowed(mask.device):
        return False  # (under torch.compile its values cannot be read)
    upper = torch.ones(s, s, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, upper))
    return bool(torch.equal(torch.isneginf(mask), upper) and (mask[~upper] == 0).all())


class TransformerEncoder(nn.Module, NoTorchScript):
    """Drop-in for :class:`torch.nn.TransformerEncoder` that computes only the real tokens.

    Same constructor (encoder_layer, num_layers, norm=None, enable_nested_tensor=True,
    mask_check=True) plus keyword-only ``padding_free`` (default True) and ``backend``; same
    submodules and ``state_dict`` keys (``layers.{i}.*``, ``norm.*``). ``encoder_layer`` is a
    :class:`TransformerEncoderLayer` or a ``torch.nn.TransformerEncoderLayer`` (converted), cloned
    ``num_layers`` times as torch does (the clones of a fastbert layer take ``backend`` when it is
    given). :meth:`from_torch` converts an existing encoder, sharing its Parameters.

    ``forward(src, mask=None, src_key_padding_mask=None, is_causal=None)`` -> src's shape (S, N, E)
    (or (N, S, E) with ``batch_first``, or unbatched (S, E)). With a key padding mask (bool, True =
    padded, or float with 0 / -inf) and no ``mask`` other than the causal one, the padding is
    removed once (:func:`fastbert.unpad_input`), every layer runs on the packed real tokens
    (:meth:`TransformerEncoderLayer.forward_packed`: varlen attention, causal per sequence when
    the mask is causal), then ``norm``, and the tokens are scattered back: **padded positions of
    the output are 0**, as torch's own nested-tensor fast path gives them without a ``norm`` (with
    one, torch's gives ``norm(0)`` there; its padded path computes values there that no real token
    depends on). This runs in training too (torch's fast path is inference-only), with gradients,
    and compiles as one graph (``torch.compile(fullgraph=True)`` with Dynamo told to capture
    data-dependent shapes, as for :class:`fastbert.models.BertEncoder`). ``mask`` is taken as the
    causal mask when ``is_causal=True`` says so (torch's hint, trusted as torch does) or when its
    values are those of ``nn.Transformer.generate_square_subsequent_mask``. Any other call (no
    padding mask, another ``mask``, a float padding mask holding a bias, ``padding_free=False``, a
    layer whose attention adds keys: ``bias_k`` / ``add_zero_attn``) runs the layers one after
    another on the padded batch, as torch's padded path does; so does, under torch.compile (where
    mask values cannot be read), a float padding mask or a causal ``mask`` without
    ``is_causal=True``: the same outputs on real tokens, torch's padded-path values at padded
    positions. ``enable_nested_tensor`` and ``mask_check`` are kept as attributes only (no nested
    tensors are made).
    """

    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None,
                 enable_nested_tensor: bool = True, mask_check: bool = True, *,
                 padding_free: bool = True, backend: Optional[str] = None) -> None:
        super().__init__()
        backend = check_backend(backend)
        if isinstance(encoder_layer, nn.TransformerEncoderLayer):
            encoder_layer = TransformerEncoderLayer.from_torch(copy.deepcopy(encoder_layer), backend=backend)
        elif not isinstance(encoder_layer, TransformerEncoderLayer):
            raise TypeError(f"encoder_layer must be a fastbert.nn.TransformerEncoderLayer or a "
                            f"torch.nn.TransformerEncoderLayer, got {type_name(encoder_layer)}")
        num_layers = check_positive_int("num_layers", num_layers)
        if norm is not None and not isinstance(norm, nn.Module):
            raise TypeError(f"norm must be an nn.Module or None, got {type_name(norm)}")
        if not isinstance(padding_free, bool):
            raise TypeError(f"padding_free must be a bool, got {type_name(padding_free)}")
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        if backend is not None:  # the clones of a fastbert layer built with another backend
            for m in self.layers.modules():
                if isinstance(m, NoTorchScript) and hasattr(m, "backend"):
                    m.backend = backend
        self.num_layers = num_layers
        self.norm = norm
        self.enable_nested_tensor = enable_nested_tensor
        self.use_nested_tensor = False  # read by code that inspects torch's encoder
        self.mask_check = mask_check
        self.padding_free = padding_free

    @classmethod
    def from_torch(cls, module: nn.TransformerEncoder, *, padding_free: bool = True,
                   backend: Optional[str] = None) -> "TransformerEncoder":
        """A fastbert encoder sharing every Parameter of ``module``: each layer becomes a
        :class:`TransformerEncoderLayer` (:meth:`TransformerEncoderLayer.from_torch`; a layer that
        already is one is kept), ``norm`` is kept as it is."""
        if not isinstance(module, nn.TransformerEncoder):
            raise TypeError(f"module must be a torch.nn.TransformerEncoder, got {type_name(module)}")
        check_torch_computation(module, nn.TransformerEncoder, cls)
        backend = check_backend(backend)
        layers = []
        for layer in module.layers:
            if isinstance(layer, nn.TransformerEncoderLayer):
                layer = TransformerEncoderLayer.from_torch(layer, backend=backend)
            elif not isinstance(layer, TransformerEncoderLayer):
                raise TypeError(f"module.layers holds a {type_name(layer)}: expected "
                                "torch.nn.TransformerEncoderLayer")
            elif backend is not None and layer.backend != backend:
                raise ValueError(f"module.layers[{len(layers)}] is a fastbert TransformerEncoderLayer with "
                                 f"backend={layer.backend!r}, kept as it is: backend={backend!r} would not "
                                 "reach it (pass backend=None, or build it with that backend)")
            layers.append(layer)
        new = adopt(cls, module, padding_free=padding_free, use_nested_tensor=False)
        new.layers = nn.ModuleList(layers)
        new.__dict__.setdefault("enable_nested_tensor", getattr(module, "enable_nested_tensor", True))
        new.__dict__.setdefault("mask_check", getattr(module, "mask_check", True))
        return new

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, padding_free={self.padding_free}"

    def _packed_plan(self, src: Tensor, mask: Optional[Tensor], src_key_padding_mask: Optional[Tensor],
                     is_causal: Optional[bool]):
        """(real-token mask (N, S) bool, causal) when the packed path applies, else None."""
        if not self.padding_free or src_key_padding_mask is None or src.dim() != 3 or src.numel() == 0:
            return None  # (an empty batch: the padded path returns it empty)
        if any(layer.self_attn.packed_unsupported() for layer in self.layers):
            return None
        # a hook on a layer or its self_attn (or a forward replaced on one) runs on the padded path
        if not all(runs_plainly(m, type(m)) for layer in self.layers for m in (layer, layer.self_attn)):
            return None
        first = self.layers[0].self_attn
        n, s = (src.shape[0], src.shape[1]) if first.batch_first else (src.shape[1], src.shape[0])
        if tuple(src_key_padding_mask.shape) != (n, s) or src_key_padding_mask.device != src.device:
            return None  # the layers report the error
        causal = False
        if mask is not None:
            # is_causal=True is torch's hint that ``mask`` is the causal mask (trusted, as torch
            # does); without it the mask's values are compared with the causal mask
            hinted = is_causal is True and mask.dim() == 2 and tuple(mask.shape) == (s, s)
            if not (hinted or _is_causal_mask(mask, s)):
                return None
            causal = True
        elif is_causal:
            return None  # torch's error (a causal hint needs the mask) comes from the layers
        real = _padding_only(src_key_padding_mask)
        return None if real is None else (real, causal)

    def forward(self, src: Tensor, mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, is_causal: Optional[bool] = None) -> Tensor:
        if not isinstance(src, Tensor):
            raise TypeError(f"src must be a torch.Tensor, got {type_name(src)}")
        for name, m in (("mask", mask), ("src_key_padding_mask", src_key_padding_mask)):
            _check_mask_dtype(name, m)
        plan = self._packed_plan(src, mask, src_key_padding_mask, is_causal)
        if plan is None:
            out = src
            for layer in self.layers:
                out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                            is_causal=bool(is_causal))
            return self.norm(out) if self.norm is not None else out
        real, causal = plan
        batch_first = self.layers[0].self_attn.batch_first
        e = self.layers[0].self_attn.embed_dim
        if src.shape[-1] != e:
            raise ValueError(f"src must end in d_model = {e}, got shape {tuple(src.shape)}")
        check_input("src", src, self.layers[0].self_attn.out_proj.weight)
        n, s = real.shape
        if batch_first:
            packed, indices, cu_seqlens, max_seqlen = unpad_input(src, real)
        else:
            # sequence-first (S, N, E): the real tokens are gathered straight from src's rows
            # (token (b, t) is row t * N + b), in the batch-major order of cu_seqlens, and scattered
            # back the same way: no transposed copy of src, and the output is (S, N, E) contiguous
            _, indices, cu_seqlens, max_seqlen = unpad_input(real, real)
            indices = (indices % s) * n + indices // s
            packed = src.reshape(s * n, e).index_select(0, indices)
        for layer in self.layers:
            packed = layer.forward_packed(packed, cu_seqlens, max_seqlen, is_causal=causal)
        if self.norm is not None:
            packed = self.norm(packed)
        return pad_input(packed, indices, n, s) if batch_first else pad_input(packed, indices, s, n)
