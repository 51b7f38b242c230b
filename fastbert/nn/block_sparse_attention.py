"""``fastbert.nn.BlockSparseSelfAttention``: multi-head self-attention restricted to the blocks of a
layout (a tensor, or a preset of :mod:`fastbert.sparsity`), on :func:`fastbert.block_sparse_attention`."""
from __future__ import annotations

import numbers
import weakref
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import Tensor

from .. import ops, sparsity
from .._validation import check_int, tensor_version, type_name
from ..ops.block_sparse_attention import check_block_size
from ._self_attention import SelfAttentionBase
from ._utils import check_positive_int

__all__ = ["BlockSparseSelfAttention", "PRESETS"]

# Preset names accepted for ``layout`` (functions of fastbert.sparsity with the signature
# ``preset(seq_len, block_size, **layout_kwargs, device=...) -> bool (H or 1, nb, nb)``).
PRESETS = ("dense", "sliding_window", "global_tokens", "longformer", "bigbird", "fixed", "strided")
_MAX_CACHED = 64  # layouts kept per module (one per number of blocks, block size and device)
# Preset arguments the module sets itself (a self-attention layout for the input's length).
_SET_BY_MODULE = ("seq_len", "block_size", "key_len", "device")


class BlockSparseSelfAttention(SelfAttentionBase):
    """Multi-head self-attention where query block i sees key block j iff ``layout[h, i, j]``.

    Args:
        embed_dim, num_heads: model width E and heads H (E divisible by H).
        layout: either a bool tensor (H or 1, nb, nb) covering the longest sequence
            (``nb >= ceil(L / block_size)``; a shorter input uses its top-left corner), stored as
            the buffer ``layout`` (a tensor assigned to ``module.layout`` later is used instead,
            on a preset module too); or the name of a :mod:`fastbert.sparsity` preset (one of
            ``PRESETS``), built for each input length as
            ``preset(L, block_size, **layout_kwargs)`` and cached per number of blocks and device
            (the 64 most recently used); under torch.compile built in the graph instead, so that
            ``dynamic=True`` compiles once for every length, and ``torch.export`` with a dynamic
            length gives one program for all lengths (``"bigbird"``, whose random blocks are
            drawn on the host: once per block count, and export specializes the length).
        block_size: tokens per block side.
        layout_kwargs: keyword arguments of the preset (sizes in blocks, e.g. ``{"window": 2}``).
        dropout: attention-probability dropout (training only).
        bias: biases of the projections. batch_first: (N, L, E) if True (default), else (L, N, E).
        backend: passed to :func:`fastbert.block_sparse_attention`.

    Parameters: ``in_proj_weight`` (3E, E), ``in_proj_bias`` (3E,), ``out_proj`` (named as in
    ``torch.nn.MultiheadAttention``).

    forward(x, key_padding_mask=None) -> same shape as x. ``key_padding_mask`` (N, L) is bool with
    True = padding (``torch.nn`` convention). A query that sees no real key returns 0 before
    ``out_proj`` (so the output row equals ``out_proj.bias``).
    """

    def __init__(self, embed_dim: int, num_heads: int, layout: Union[str, Tensor] = "sliding_window",
                 block_size: int = 64, *, layout_kwargs: Optional[Dict[str, Any]] = None,
                 dropout: float = 0.0, bias: bool = True, batch_first: bool = True, device=None,
                 dtype=None, backend: Optional[str] = None) -> None:
        super().__init__(embed_dim, num_heads, dropout, bias, batch_first, device, dtype, backend)
        self.block_size = check_block_size(check_positive_int("block_size", block_size))
        if layout_kwargs is not None and not isinstance(layout_kwargs, Mapping):
            raise TypeError(f"layout_kwargs must be a dict of the preset's keyword arguments or "
                            f"None, got {type_name(layout_kwargs)}")
        self.layout_kwargs = dict(layout_kwargs or {})
        # key -> (weak reference to the layout buffer, or None for a preset; the layout for one nb)
        self._layouts: Dict[tuple, Any] = {}
        if isinstance(layout, str):
            if layout not in PRESETS:
                raise ValueError(f"layout {layout!r} is not a preset; expected a bool layout tensor "
                                 f"or one of {PRESETS}")
            reserved = sorted(set(self.layout_kwargs) & set(_SET_BY_MODULE))
            if reserved:
                raise ValueError(f"layout_kwargs may not set {reserved}: the module builds each "
                                 "layout itself for the input's length, block_size and device "
                                 "(self-attention: key_len = seq_len)")
            self.preset = layout
            self._preset_fn = getattr(sparsity, layout)
            self.register_buffer("layout", None)
            # Build one layout now, so that bad kwargs fail here rather than on the first forward.
            probe = self._preset_fn(block_size, block_size, **self._kwargs_for(1))
            if probe.shape[0] not in (1, num_heads):
                raise ValueError(f"the {layout!r} preset with layout_kwargs {self.layout_kwargs} "
                                 f"gives layouts for {probe.shape[0]} heads; the module has "
                                 f"num_heads = {num_heads} (use 1 or {num_heads})")
        elif isinstance(layout, Tensor):
            if layout.dtype != torch.bool:
                raise TypeError(f"layout must be a bool tensor (H or 1, nb, nb), got dtype "
                                f"{layout.dtype}")
            if layout.dim() != 3 or layout.shape[0] not in (1, num_heads):
                raise ValueError(f"layout must be a bool tensor (H or 1, nb, nb) with H = {num_heads}, "
                                 f"got dtype {layout.dtype} and shape {tuple(layout.shape)}")
            if layout_kwargs:
                raise ValueError("layout_kwargs only applies to a preset name")
            self.preset = None
            self._preset_fn = None
            self.register_buffer("layout", layout.to(device=device))
        else:
            raise TypeError(f"layout must be a bool tensor or a preset name, got {type_name(layout)}")

    def extra_repr(self) -> str:
        what = self.preset if self.layout is None else f"tensor{tuple(self.layout.shape)}"
        kwargs = f", layout_kwargs={self.layout_kwargs}" if self.layout_kwargs else ""
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, layout={what}, "
                f"block_size={self.block_size}{kwargs}, dropout={self.dropout}, "
                f"backend={self.backend!r}")

    def __getstate__(self):
        state = super().__getstate__()
        state["_layouts"] = {}  # a cache (holding weak references): rebuilt on demand
        return state

    def _kwargs_for(self, nb: int) -> Dict[str, Any]:
        """The preset's kwargs for an input of ``nb`` blocks: global blocks past its end are left
        out (those tokens are not in this input; with ``global_blocks = n`` >= nb every block is
        global), so that one module serves inputs shorter than its global blocks. Anything
        malformed goes to the preset as given, which says what is wrong. With a block count known
        only at run time (``torch.export`` with a dynamic length) they are kept: the exported
        program then checks at run time that every global block lies inside the input."""
        kwargs = dict(self.layout_kwargs)
        if isinstance(nb, torch.SymInt):
            return kwargs
        g = kwargs.get("global_blocks")
        if isinstance(g, Tensor) and g.dim() <= 1 and not (g.is_floating_point() or g.is_complex()
                                                           or g.dtype == torch.bool
                                                           or g.device.type == "meta"):
            g = g.tolist()
        if isinstance(g, numbers.Integral) and not isinstance(g, bool) and g > nb:
            kwargs["global_blocks"] = nb
        elif isinstance(g, (list, tuple, range)) and all(
                isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in g):
            kwargs["global_blocks"] = [x for x in g if x < nb]
        return kwargs

    def layout_for(self, seq_len: int, device: torch.device) -> Tensor:
        """The (H or 1, nb, nb) layout used for inputs of ``seq_len`` tokens, nb = ceil(seq_len /
        block_size) (cached per nb, block_size and device, the 64 most recent: the same tensor
        object is returned for the same nb, so fastbert.sparsity's preparation cache hits).

        A ``layout`` buffer, when the module has one (given at construction or assigned later),
        is used; otherwise the preset is built."""
        seq_len = check_int("seq_len", seq_len)
        block_size = check_block_size(self.block_size)  # the attribute may have been edited
        nb = -(-seq_len // block_size)
        full = self.layout
        if full is None and self._preset_fn is None:
            raise ValueError("the module has neither a layout tensor (its `layout` buffer is None) "
                             "nor a preset to build one from")
        if seq_len == 0:  # an empty input: an empty layout (the op returns an empty output)
            heads = 1 if full is None else full.shape[0]
            return torch.zeros((heads, 0, 0), dtype=torch.bool, device=device)
        if full is not None:
            if full.dim() != 3 or full.shape[1] < nb or full.shape[2] < nb:
                raise ValueError(f"the layout {tuple(full.shape)} covers too few blocks of "
                                 f"{block_size} tokens for a sequence of {seq_len} tokens (needs "
                                 f"(H or 1, >= {nb}, >= {nb}))")
            if torch.compiler.is_compiling():  # traced: no host-side cache; a view of the buffer
                return full[:, :nb, :nb].to(device)
            # keyed on the buffer object and its version: assigning or editing it takes effect
            key = (nb, block_size, str(device), id(full), full.data_ptr(), tensor_version(full))
        else:  # keyed on the kwargs too: editing module.layout_kwargs takes effect
            if torch.compiler.is_compiling():
                # traced: built in the graph (the preset's few tensor ops), no host-side cache,
                # whose size and keys would be guarded on and recompile every new length
                return self._preset_fn(nb * block_size, block_size, device=device,
                                       **self._kwargs_for(nb))
            key = (nb, block_size, str(device), repr(self.layout_kwargs))
        entry = self._layouts.get(key)
        # a buffer's entry is also tied to the buffer object: a new one at a recycled id never hits
        if entry is None or (entry[0] is not None and entry[0]() is not full):
            # Cached layouts are made as normal tensors even under torch.inference_mode: a layout
            # first built there (a validation pass before training) may later be saved for backward.
            with torch.inference_mode(False):
                if full is not None:
                    entry = (weakref.ref(full), full[:, :nb, :nb].to(device, copy=True))
                else:
                    entry = (None, self._preset_fn(nb * block_size, block_size, device=device,
                                                   **self._kwargs_for(nb)))
            if full is not None:  # entries of an earlier buffer or version can never hit again
                self._layouts = {k: v for k, v in self._layouts.items()
                                 if v[0] is None or k[3:] == key[3:]}
            while len(self._layouts) >= _MAX_CACHED:  # drop the least recently used
                self._layouts.pop(next(iter(self._layouts)))
        else:
            self._layouts.pop(key)  # re-inserted below: most recently used last
        self._layouts[key] = entry
        return entry[1]

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        x_bf, q, k, v = self._heads(x, key_padding_mask)
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        out = ops.block_sparse_attention(q, k, v, self.layout_for(q.shape[2], q.device),
                                         self.block_size, attn_mask=mask,
                                         dropout_p=self.dropout if self.training else 0.0,
                                         backend=self.backend)
        return self._output(out)
