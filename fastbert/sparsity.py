"""Block-sparse layouts for :func:`fastbert.block_sparse_attention`, and their cached preparation.

A *layout* is a bool tensor of shape (H or 1, ceil(Lq / block_size), ceil(Lk / block_size)):
query block ``i`` of head ``h`` sees key block ``j`` iff ``layout[h, i, j]`` (a leading dim of 1 is
shared by all heads); an integer tensor works too, nonzero = attend (the presets return bool). Query
block ``i`` holds tokens ``i * block_size ... (i + 1) * block_size - 1`` (the last block may be
partial).

Presets (every size argument other than ``seq_len``/``key_len`` and ``block_size`` is counted in
**blocks**, never in tokens; convert with ``ceil(tokens / block_size)``):

=====================  =================================================================
``dense``               every block
``sliding_window``      a band of ``window`` blocks on each side of the diagonal
``global_tokens``       band + global blocks (Longformer); alias ``longformer``
``bigbird``             band + global + seeded random blocks (BigBird)
``fixed``               Sparse Transformer "fixed": own stride group + summary columns
``strided``             Sparse Transformer "strided": local band + every stride-th block
``from_token_mask``     the smallest layout covering a token-level (Lq, Lk) mask
=====================  =================================================================

plus :func:`union`, :func:`intersection`, :func:`density` (a report) and :func:`render` (the
pictures in the docstrings below are ``render`` outputs: ``#`` = attend, ``.`` = skip; rows are
query blocks, columns key blocks). The deterministic presets return one layout shared by all heads
(leading dim 1); stack per-head layouts with ``torch.cat`` along dim 0.

:func:`prepare_layout` turns a layout into the lists the Triton kernel walks (each query block's
key blocks, and each key block's query blocks for the backward pass) and caches them per layout
tensor, so a model that keeps its layout (e.g. as a buffer) pays the preparation once.
"""
from __future__ import annotations

import numbers
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._validation import check_bool, tensor_version, type_name

__all__ = [
    "dense",
    "sliding_window",
    "global_tokens",
    "longformer",
    "bigbird",
    "fixed",
    "strided",
    "from_token_mask",
    "union",
    "intersection",
    "density",
    "DensityReport",
    "render",
    "num_blocks",
    "prepare_layout",
    "PreparedLayout",
    "clear_cache",
    "cache_info",
]

Device = Union[str, torch.device, None]


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------
def _check_int(name: str, value, minimum: int, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type_name(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def _check_device(device: Device) -> Optional[torch.device]:
    """None, a device string / torch.device / CUDA index -> None or a torch.device."""
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
        raise TypeError(f"device must be None, a str, a torch.device or an int, got "
                        f"{type_name(device)}")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not a valid torch device: {e}") from None


def _check_has_values(name: str, layout: Tensor) -> None:
    if layout.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor: it has no values to read")


def _check_length(name: str, value):
    """A sequence length: an int >= 0, or a symbolic one (``torch.SymInt``: a length only known at
    run time while ``torch.export`` or ``torch.compile`` traces), kept symbolic (a run-time check)
    so that the layout is built in the graph for every length."""
    if isinstance(value, torch.SymInt):
        torch._check(value >= 0, lambda: f"{name} must be >= 0")
        return value
    return _check_int(name, value, 0)


def num_blocks(seq_len: int, block_size: int) -> int:
    """ceil(seq_len / block_size): the number of blocks covering ``seq_len`` tokens."""
    seq_len = _check_length("seq_len", seq_len)
    block_size = _check_int("block_size", block_size, 1)
    return -(-seq_len // block_size)


def _grid(seq_len, block_size, key_len) -> Tuple[int, int]:
    seq_len = _check_length("seq_len", seq_len)
    block_size = _check_int("block_size", block_size, 1)
    key_len = seq_len if key_len is None else _check_length("key_len", key_len)
    return num_blocks(seq_len, block_size), num_blocks(key_len, block_size)


def _at_most_blocks(n: int, nbq: int, nbk: int) -> int:
    """A window or stride (in blocks) capped at the grid's longer side: beyond it the layout is the
    same, and a capped int cannot wrap (one beyond int64 did, e.g. window=2**63 gave no band)."""
    if isinstance(nbq, torch.SymInt) or isinstance(nbk, torch.SymInt):  # torch.export: symbolic
        return torch.sym_min(n, torch.sym_max(nbq, nbk))
    return min(n, max(nbq, nbk))  # (torch 2.11's Dynamo cannot trace sym_max of ints)


def _ij(nbq: int, nbk: int, device: Device) -> Tuple[Tensor, Tensor]:
    device = _check_device(device)
    i = torch.arange(nbq, device=device)[:, None]  # query block index, [nbq, 1]
    j = torch.arange(nbk, device=device)[None, :]  # key block index,   [1, nbk]
    return i, j


def _global_indices(global_blocks, nbq: int, nbk: int) -> list:
    limit = max(nbq, nbk)
    if isinstance(global_blocks, bool):
        raise TypeError("global_blocks must be an int (the first n blocks) or a sequence of block "
                        "indices, got bool")
    if isinstance(global_blocks, numbers.Integral):
        n = _check_int("global_blocks", global_blocks, 0)
        _check_below(n, limit + 1, lambda: f"global_blocks = {n} exceeds the number of blocks "
                                           f"({limit})")
        return list(range(n))
    if isinstance(global_blocks, Tensor):
        if global_blocks.is_floating_point() or global_blocks.is_complex() or global_blocks.dim() > 1:
            raise TypeError(f"global_blocks as a tensor must be a 1-D integer tensor of block "
                            f"indices, got dtype {global_blocks.dtype} and shape "
                            f"{tuple(global_blocks.shape)}")
        _check_has_values("global_blocks", global_blocks)
        if global_blocks.dim() == 0:
            return _global_indices(int(global_blocks), nbq, nbk)
        global_blocks = global_blocks.tolist()
    if not isinstance(global_blocks, (list, tuple, range)):
        raise TypeError("global_blocks must be an int (the first n blocks) or a sequence of block "
                        f"indices, got {type_name(global_blocks)}")
    out = []
    for g in global_blocks:
        if isinstance(g, bool) or not isinstance(g, numbers.Integral):
            raise TypeError(f"global_blocks entries must be ints, got {type_name(g)}")
        if g < 0:
            raise ValueError(f"global block index {g} is out of range [0, {limit})")
        _check_below(g, limit, lambda: f"global block index {g} is out of range [0, {limit})")
        out.append(int(g))
    return out


def _check_below(value: int, limit, message) -> None:
    """``value < limit`` or a ValueError with ``message()``; with a symbolic limit (a length known
    only at run time, see :func:`_check_length`) a run-time check instead of a guard on it."""
    if isinstance(limit, torch.SymInt):
        torch._check(value < limit, message)
    elif not value < limit:
        raise ValueError(message())


def _check_layout(name: str, layout) -> Tensor:
    """A 3-D bool layout, or an integer one (nonzero = attend), as the attention op accepts."""
    if not isinstance(layout, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type_name(layout)}")
    if layout.is_floating_point() or layout.is_complex():
        raise TypeError(f"{name} must be a bool (or integer, nonzero = attend) tensor, got dtype "
                        f"{layout.dtype}")
    if layout.dim() != 3:
        raise ValueError(f"{name} must be 3-D (H or 1, query blocks, key blocks), got shape "
                         f"{tuple(layout.shape)}")
    return layout


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------
def dense(seq_len: int, block_size: int = 64, *, key_len: Optional[int] = None,
          device: Device = None) -> Tensor:
    """Every query block sees every key block.

    Args:
        seq_len: Lq in tokens; key_len: Lk in tokens (default Lq); block_size: tokens per block.

    Returns:
        bool (1, ceil(Lq / block_size), ceil(Lk / block_size)).

    Picture (``dense(3 * 64, 64, key_len=4 * 64)``)::

        # # # #
        # # # #
        # # # #
    """
    nbq, nbk = _grid(seq_len, block_size, key_len)
    return torch.ones(1, nbq, nbk, dtype=torch.bool, device=_check_device(device))


def sliding_window(seq_len: int, block_size: int = 64, *, window: int = 1, causal: bool = False,
                   key_len: Optional[int] = None, device: Device = None) -> Tensor:
    """A band around the diagonal: query block i sees key blocks j with |i - j| <= window.

    ``window`` is counted in **blocks** on each side (a token window of w tokens is
    ``window = ceil(w / block_size)``; tokens in the same or an adjacent block can be up to
    ``(window + 1) * block_size - 1`` apart). With ``causal=True`` only ``i - window <= j <= i``.

    Returns:
        bool (1, ceil(Lq / block_size), ceil(Lk / block_size)).

    Picture (``sliding_window(6 * 64, 64, window=1)``)::

        # # . . . .
        # # # . . .
        . # # # . .
        . . # # # .
        . . . # # #
        . . . . # #

    Picture (``sliding_window(6 * 64, 64, window=2, causal=True)``)::

        # . . . . .
        # # . . . .
        # # # . . .
        . # # # . .
        . . # # # .
        . . . # # #
    """
    nbq, nbk = _grid(seq_len, block_size, key_len)
    window = _at_most_blocks(_check_int("window", window, 0), nbq, nbk)
    causal = check_bool("causal", causal)
    i, j = _ij(nbq, nbk, device)
    keep = (j - i).abs() <= window
    if causal:
        keep = keep & (j <= i)
    return keep.unsqueeze(0)


def global_tokens(seq_len: int, block_size: int = 64, *, window: int = 1,
                  global_blocks: Union[int, Sequence[int]] = 1, key_len: Optional[int] = None,
                  device: Device = None) -> Tensor:
    """Longformer: a sliding window (in blocks, see :func:`sliding_window`) plus global blocks.

    A global block g attends to everything (row g) and is attended by everything (column g); this
    is where [CLS] and other task tokens go. ``global_blocks`` is an int n (blocks 0 .. n-1) or a
    sequence of block indices.

    Returns:
        bool (1, ceil(Lq / block_size), ceil(Lk / block_size)).

    Picture (``global_tokens(6 * 64, 64, window=1, global_blocks=1)``)::

        # # # # # #
        # # # . . .
        # # # # . .
        # . # # # .
        # . . # # #
        # . . . # #
    """
    nbq, nbk = _grid(seq_len, block_size, key_len)
    keep = sliding_window(seq_len, block_size, window=window, key_len=key_len, device=device)[0]
    globals_ = _global_indices(global_blocks, nbq, nbk)
    if globals_:  # row g and column g, where the grid has them (compared, not indexed: no branch
        # on the number of blocks, which may be known only at run time)
        g = torch.tensor(globals_, device=keep.device)
        i, j = _ij(nbq, nbk, keep.device)
        keep = keep | (i[..., None] == g).any(-1) | (j[..., None] == g).any(-1)
    return keep.unsqueeze(0)


longformer = global_tokens


def bigbird(seq_len: int, block_size: int = 64, *, window: int = 1,
            global_blocks: Union[int, Sequence[int]] = 1, random_blocks: int = 2, seed: int = 0,
            num_heads: int = 1, key_len: Optional[int] = None, device: Device = None) -> Tensor:
    """BigBird: sliding window + global blocks (as :func:`global_tokens`) + random blocks.

    Every non-global query block also sees ``random_blocks`` key blocks drawn uniformly among the
    blocks it does not already see (fewer when fewer are left). The draw uses its own
    ``torch.Generator`` seeded with ``seed``: the same arguments always give the same layout and
    torch's global random state is untouched. With ``num_heads > 1`` every head gets its own
    random blocks and the result has shape (num_heads, ...).

    Returns:
        bool (num_heads, ceil(Lq / block_size), ceil(Lk / block_size)).

    Picture (``bigbird(8 * 64, 64, window=1, global_blocks=1, random_blocks=1, seed=0)``; which
    blocks are random depends on the seed)::

        # # # # # # # #
        # # # . . . . #
        # # # # . # . .
        # . # # # . . #
        # . . # # # . #
        # . . . # # # #
        # . . # . # # #
        # . . . # . # #
    """
    # the random blocks are drawn for a concrete grid: a length known only at run time (traced)
    # is made concrete here (torch.compile recompiles per block count; torch.export reports the
    # length as specialized)
    seq_len = int(_check_length("seq_len", seq_len))
    key_len = None if key_len is None else int(_check_length("key_len", key_len))
    nbq, nbk = _grid(seq_len, block_size, key_len)
    random_blocks = _check_int("random_blocks", random_blocks, 0)
    num_heads = _check_int("num_heads", num_heads, 1)
    seed = _check_int("seed", seed, 0, 2 ** 64 - 1)
    device = _check_device(device)
    base = global_tokens(seq_len, block_size, window=window, global_blocks=global_blocks,
                         key_len=key_len, device="cpu")[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # Uniform scores on the free blocks; the top random_blocks of each row are drawn.
    score = torch.rand(num_heads, nbq, nbk, generator=gen)
    score = score.masked_fill(base, -1.0)
    is_global = base.all(dim=1)  # global query rows already see everything
    layout = base.expand(num_heads, nbq, nbk).clone()
    r = min(random_blocks, nbk)
    if r > 0:
        top, idx = score.topk(r, dim=-1)
        chosen = torch.zeros_like(layout)
        chosen.scatter_(-1, idx, top >= 0.0)  # only blocks that were free
        chosen[:, is_global] = False
        layout |= chosen
    return layout.to(device)


def fixed(seq_len: int, block_size: int = 64, *, stride: int = 4, summary: int = 1,
          causal: bool = False, key_len: Optional[int] = None, device: Device = None) -> Tensor:
    """Sparse Transformer "fixed" pattern (Child et al., 2019), in blocks.

    Blocks are grouped in runs of ``stride`` blocks. Query block i sees every key block j of its
    own group (``j // stride == i // stride``) and the last ``summary`` blocks of every group
    (``j % stride >= stride - summary``), which carry information between groups. With
    ``causal=True`` only ``j <= i``. ``stride`` and ``summary`` count blocks; 1 <= summary <= stride.

    Returns:
        bool (1, ceil(Lq / block_size), ceil(Lk / block_size)).

    Picture (``fixed(8 * 64, 64, stride=4, summary=1)``)::

        # # # # . . . #
        # # # # . . . #
        # # # # . . . #
        # # # # . . . #
        . . . # # # # #
        . . . # # # # #
        . . . # # # # #
        . . . # # # # #
    """
    nbq, nbk = _grid(seq_len, block_size, key_len)
    stride = _check_int("stride", stride, 1)
    summary = _check_int("summary", summary, 1)
    if summary > stride:
        raise ValueError(f"summary must be <= stride, got summary = {summary}, stride = {stride}")
    causal = check_bool("causal", causal)
    stride, summary = _at_most_blocks(stride, nbq, nbk), _at_most_blocks(summary, nbq, nbk)
    i, j = _ij(nbq, nbk, device)
    keep = (j // stride == i // stride) | (j % stride >= stride - summary)
    if causal:
        keep = keep & (j <= i)
    return keep.unsqueeze(0)


def strided(seq_len: int, block_size: int = 64, *, stride: int = 4, causal: bool = False,
            key_len: Optional[int] = None, device: Device = None) -> Tensor:
    """Sparse Transformer "strided" pattern (Child et al., 2019), in blocks.

    Query block i sees the ``stride - 1`` blocks on each side of it (``|i - j| < stride``) and
    every ``stride``-th block from it (``(i - j) % stride == 0``). With ``causal=True`` only
    ``j <= i`` (the paper's autoregressive form). ``stride`` counts blocks.

    Returns:
        bool (1, ceil(Lq / block_size), ceil(Lk / block_size)).

    Picture (``strided(8 * 64, 64, stride=3, causal=True)``)::

        # . . . . . . .
        # # . . . . . .
        # # # . . . . .
        # # # # . . . .
        . # # # # . . .
        . . # # # # . .
        # . . # # # # .
        . # . . # # # #
    """
    nbq, nbk = _grid(seq_len, block_size, key_len)
    stride = _at_most_blocks(_check_int("stride", stride, 1), nbq, nbk)
    causal = check_bool("causal", causal)
    i, j = _ij(nbq, nbk, device)
    keep = ((i - j).abs() < stride) | ((i - j) % stride == 0)
    if causal:
        keep = keep & (j <= i)
    return keep.unsqueeze(0)


def from_token_mask(mask: Tensor, block_size: int = 64) -> Tensor:
    """The smallest layout covering a token-level mask: block (i, j) is on iff some token pair in
    it is True. The layout admits more pairs than ``mask`` (whole blocks); pass ``mask`` as the
    ``attn_mask`` too for the exact pattern.

    Args:
        mask: bool (Lq, Lk) shared by all heads, or (H, Lq, Lk); True = attend.

    Returns:
        bool (1 or H, ceil(Lq / block_size), ceil(Lk / block_size)).

    Picture (a causal 8 x 8 token mask, ``block_size=2``)::

        # . . .
        # # . .
        # # # .
        # # # #
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type_name(mask)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = attend), got dtype {mask.dtype}")
    if mask.dim() not in (2, 3):
        raise ValueError(f"mask must be (Lq, Lk) or (H, Lq, Lk), got shape {tuple(mask.shape)}")
    block_size = _check_int("block_size", block_size, 1)
    m = mask if mask.dim() == 3 else mask.unsqueeze(0)
    h, lq, lk = m.shape
    if h == 0 or lq == 0 or lk == 0:
        raise ValueError(f"mask must have H, Lq, Lk >= 1, got shape {tuple(mask.shape)}")
    nbq, nbk = num_blocks(lq, block_size), num_blocks(lk, block_size)
    padded = m.new_zeros((h, nbq * block_size, nbk * block_size))
    padded[:, :lq, :lk] = m
    return padded.view(h, nbq, block_size, nbk, block_size).any(dim=4).any(dim=2)


# ----------------------------------------------------------------------------------------------
# Combining and inspecting
# ----------------------------------------------------------------------------------------------
def _combine(name: str, layouts, op) -> Tensor:
    if len(layouts) == 1 and isinstance(layouts[0], (list, tuple)):
        layouts = tuple(layouts[0])
    if not layouts:
        raise ValueError(f"{name} needs at least one layout")
    first = _check_layout("layouts[0]", layouts[0])
    heads = {first.shape[0]}
    out = first != 0  # bool, also for an integer layout (a new tensor either way)
    for n, lay in enumerate(layouts[1:], start=1):
        _check_layout(f"layouts[{n}]", lay)
        if lay.shape[1:] != first.shape[1:]:
            raise ValueError(f"layouts[{n}] has {tuple(lay.shape[1:])} blocks but layouts[0] has "
                             f"{tuple(first.shape[1:])}; they must cover the same grid")
        if lay.device != first.device:
            raise ValueError(f"layouts[{n}] is on {lay.device} but layouts[0] is on {first.device}")
        heads.add(lay.shape[0])
        if len(heads - {1}) > 1:
            raise ValueError(f"layouts have head dims {sorted(heads)}; each must be 1 or the same H")
        out = op(out, lay)
    return out


def union(*layouts: Tensor) -> Tensor:
    """Blocks on in any of the layouts (same block grid; head dims 1 or a common H), as a bool
    layout; integer layouts count nonzero as on."""
    return _combine("union", layouts, torch.logical_or)


def intersection(*layouts: Tensor) -> Tensor:
    """Blocks on in all of the layouts (same block grid; head dims 1 or a common H), as a bool
    layout; integer layouts count nonzero as on."""
    return _combine("intersection", layouts, torch.logical_and)


@dataclass(frozen=True)
class DensityReport:
    """What fraction of attention a layout computes.

    ``block_density`` counts blocks; ``token_density`` (when the sequence lengths are known) counts
    (query, key) token pairs, so partial last blocks weigh what they hold.
    """

    heads: int
    blocks: Tuple[int, int]         # (query blocks, key blocks)
    nonzero_blocks: int             # over all heads
    block_density: float            # nonzero / (heads * nbq * nbk)
    per_head: Tuple[float, ...]     # block density of each head
    token_density: Optional[float]  # fraction of the Lq x Lk pairs inside on-blocks, all heads
    mean_blocks_per_row: float      # key blocks visited per query block (work per query tile)

    def __str__(self) -> str:
        s = (f"{self.heads} head(s) x {self.blocks[0]} x {self.blocks[1]} blocks: "
             f"{self.nonzero_blocks} on, block density {self.block_density:.1%}, "
             f"{self.mean_blocks_per_row:.1f} key blocks per query block")
        if self.token_density is not None:
            s += f", token density {self.token_density:.1%}"
        return s


def density(layout: Tensor, block_size: Optional[int] = None, seq_len: Optional[int] = None,
            key_len: Optional[int] = None) -> DensityReport:
    """A :class:`DensityReport` of ``layout``; pass ``block_size`` and ``seq_len`` (and ``key_len``
    when Lk != Lq) to also get the token-level density. An integer layout counts nonzero as on."""
    _check_layout("layout", layout)
    _check_has_values("layout", layout)
    h, nbq, nbk = layout.shape
    lay = layout.detach().to("cpu") != 0
    nonzero = int(lay.sum())
    total = h * nbq * nbk
    per_head = tuple(float(x) / max(nbq * nbk, 1) for x in lay.sum(dim=(1, 2)).tolist())
    token = None
    if block_size is not None or seq_len is not None or key_len is not None:
        if block_size is None or seq_len is None:
            raise ValueError("pass both block_size and seq_len (and key_len when Lk != Lq) for "
                             "the token density")
        block_size = _check_int("block_size", block_size, 1)
        lq = _check_int("seq_len", seq_len, 0)
        lk = lq if key_len is None else _check_int("key_len", key_len, 0)
        if (num_blocks(lq, block_size), num_blocks(lk, block_size)) != (nbq, nbk):
            raise ValueError(f"layout has {nbq} x {nbk} blocks but seq_len = {lq}, key_len = {lk}, "
                             f"block_size = {block_size} need {num_blocks(lq, block_size)} x "
                             f"{num_blocks(lk, block_size)}")
        rows = torch.full((nbq,), block_size, dtype=torch.float64)
        cols = torch.full((nbk,), block_size, dtype=torch.float64)
        if nbq and nbk:  # the last block of each side holds what is left of its length
            rows[-1] = lq - (nbq - 1) * block_size
            cols[-1] = lk - (nbk - 1) * block_size
        pairs = torch.einsum("i,hij,j->", rows, lay.double(), cols)
        token = float(pairs) / max(h * lq * lk, 1)
    return DensityReport(heads=h, blocks=(nbq, nbk), nonzero_blocks=nonzero,
                         block_density=nonzero / max(total, 1), per_head=per_head,
                         token_density=token, mean_blocks_per_row=nonzero / max(h * nbq, 1))


def render(layout: Tensor, head: int = 0) -> str:
    """One head of a layout as text: a row per query block, ``#`` = attend (an integer layout:
    nonzero), ``.`` = skip."""
    _check_layout("layout", layout)
    _check_has_values("layout", layout)
    head = _check_int("head", head, 0)
    if head >= layout.shape[0]:
        raise ValueError(f"head {head} is out of range for a layout with {layout.shape[0]} head(s)")
    rows = layout[head].to("cpu").tolist()
    return "\n".join(" ".join("#" if x else "." for x in row) for row in rows)


# ----------------------------------------------------------------------------------------------
# Preparation for the kernel, cached
# ----------------------------------------------------------------------------------------------
class PreparedLayout(NamedTuple):
    """The lists the Triton kernel walks; HL = layout heads (1 or H).

    ``q_index[h, i, :q_count[h, i]]`` are the key blocks of query block i in increasing order
    (the rest of the row is filler); ``k_index[h, j, :k_count[h, j]]`` the query blocks of key
    block j (the transposed lists, for dk/dv). All int32, contiguous, on the layout's device.
    ``blocks`` is the layout itself as contiguous uint8, 1 where a block is attended (the kernel
    that sums a broadcast mask's gradient looks blocks up in it).
    """

    q_count: Tensor  # (HL, NBQ)
    q_index: Tensor  # (HL, NBQ, NBK)
    k_count: Tensor  # (HL, NBK)
    k_index: Tensor  # (HL, NBK, NBQ)
    blocks: Tensor   # (HL, NBQ, NBK) uint8


def _prepare(layout: Tensor) -> PreparedLayout:
    lay = layout.bool()

    def lists(m: Tensor) -> Tuple[Tensor, Tensor]:
        count = m.sum(dim=-1, dtype=torch.int32)
        # A stable sort of "not on" puts the on-blocks first, in increasing order; no host sync.
        index = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return count.contiguous(), index.contiguous()

    q_count, q_index = lists(lay)
    k_count, k_index = lists(lay.transpose(1, 2))
    return PreparedLayout(q_count, q_index, k_count, k_index, lay.to(torch.uint8).contiguous())


# id(layout) -> (weakref to layout, signature, PreparedLayout), least recently used first. The
# weakref ties an entry to the living tensor object (a freed tensor's entry is dropped, so a new
# tensor at a recycled address or id can never hit it) and the signature includes the version
# counter, so an in-place change of the layout invalidates its entry.
_CACHE: "OrderedDict[int, tuple]" = OrderedDict()
_CACHE_SIZE = 64
_STATS = {"hits": 0, "misses": 0}


def _signature(layout: Tensor) -> tuple:
    return (layout.data_ptr(), tensor_version(layout), tuple(layout.shape), tuple(layout.stride()),
            layout.storage_offset(), layout.dtype, layout.device)


def _forget(key: int, ref) -> None:
    entry = _CACHE.get(key)
    if entry is not None and entry[0] is ref:
        del _CACHE[key]


def prepare_layout(layout: Tensor) -> PreparedLayout:
    """The kernel's lists for ``layout`` (bool, or integers with nonzero = attend; see
    :class:`PreparedLayout`), cached per layout tensor.

    The cache (LRU, 64 entries) is keyed on the tensor object itself plus its data pointer, shape,
    strides, device and version counter: reusing the same layout tensor hits, modifying it in
    place or passing a new tensor (even with equal contents) prepares again. Preparation runs on
    the layout's device without a host sync. Inference-mode tensors (no version counter) are
    never cached, nor are lists made while a CUDA graph is captured (the graph makes its own).
    Writes that bypass the version counter (through ``layout.data``, or a NumPy array sharing its
    memory) are not seen: after one, call :func:`clear_cache`.
    """
    _check_layout("layout", layout)
    if (layout.is_inference() or torch.compiler.is_compiling()
            or (layout.device.type == "cuda" and torch.cuda.is_current_stream_capturing())):
        # under CUDA-graph capture the lists are made inside the graph (its memory pool keeps
        # them, and each replay redoes them): a cached entry made before the capture would be
        # referenced by address from the graph, and freed when evicted
        return _prepare(layout)
    key = id(layout)
    sig = _signature(layout)
    entry = _CACHE.get(key)
    if entry is not None and entry[0]() is layout and entry[1] == sig:
        _CACHE.move_to_end(key)
        _STATS["hits"] += 1
        return entry[2]
    _STATS["misses"] += 1
    prepared = _prepare(layout)
    ref = weakref.ref(layout, lambda r, key=key: _forget(key, r))
    _CACHE[key] = (ref, sig, prepared)
    _CACHE.move_to_end(key)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return prepared


def clear_cache() -> None:
    """Drop every prepared layout."""
    _CACHE.clear()
    _STATS["hits"] = _STATS["misses"] = 0


def cache_info() -> dict:
    """{"hits", "misses", "size", "maxsize"} of the preparation cache."""
    return {"hits": _STATS["hits"], "misses": _STATS["misses"], "size": len(_CACHE),
            "maxsize": _CACHE_SIZE}
