"""HuggingFace ``transformers`` integration: module swaps for :func:`fastbert.optimize`, and the
``"fastbert"`` attention implementation.

Importing this module imports ``transformers`` and registers ``"fastbert"`` (see :func:`register`),
so that with transformers 5.x::

    import fastbert.integrations.huggingface
    model = AutoModel.from_pretrained(path, attn_implementation="fastbert")

runs every attention through :func:`fastbert.scaled_dot_product_attention`, padding masks included:
the name is registered both with ``AttentionInterface`` (the attention function) and with
``AttentionMaskInterface`` (the mask builder, as for "sdpa": a bool mask, True = attend, or None
without padding). Registering the attention function alone would make transformers build no mask
at all for an unknown implementation name, silently ignoring the padding. Packed batches
(``DataCollatorWithFlattening``: one row of sequences whose position ids restart, or the
flash-attention ``cu_seq_lens_*`` arguments) run through :func:`fastbert.varlen_attention`, each
sequence attending only to itself, as transformers' flash-attention path treats them.

:func:`fastbert.optimize` on a model of one of the supported families (BERT, RoBERTa, DistilBERT,
ALBERT, ELECTRA, ViT, MPNet, DeBERTa and DeBERTa-v2/v3, and BERT's copies XLM-RoBERTa, CamemBERT,
Data2Vec-Text, ERNIE; the self-attention and intermediate of the pre-LayerNorm XLM-RoBERTa-XL and
RoBERTa-PreLayerNorm; transformers 4.57 and 5.x; ModernBERT with 5.x) swaps, keeping every
Parameter object and ``state_dict`` key:

* the self-attention modules -> :class:`SelfAttention` (``scaled_dot_product_attention``; in
  ALBERT also its output dense + dropout + residual + LayerNorm, fused in ``add_layer_norm``);
* MPNet's ``MPNetAttention`` -> :class:`MPNetAttention` (the relative-position bias and the
  padding mask as one float mask; the output sublayer fused as in ALBERT), DeBERTa-v2's
  ``DisentangledSelfAttention`` -> :class:`DebertaV2SelfAttention` (its content-to-position and
  position-to-content scores, computed as transformers does, as that float mask), DeBERTa's
  (v1) -> :class:`DebertaSelfAttention` (the same, with its fused ``in_proj`` and query / value
  biases);
* the output sublayers ``dense -> dropout -> LayerNorm(. + residual)`` (``BertSelfOutput``,
  ``BertOutput`` and their RoBERTa / ELECTRA copies) -> :class:`DenseAddLayerNorm`, one
  ``add_layer_norm`` with ``input_bias = dense.bias``;
* the intermediate ``dense -> GELU`` (``BertIntermediate``, ``ViTIntermediate``, ViT 5.x's
  ``ViTMLP``) -> :class:`DenseBiasGELU` / :class:`MLP`, one ``bias_gelu``;
* DistilBERT's ``TransformerBlock`` and ALBERT's ``AlbertLayer`` (whose residual + LayerNorm live
  in the block) -> :class:`DistilBertBlock` / :class:`AlbertLayer`; ModernBERT's
  ``ModernBertEncoderLayer`` -> :class:`ModernBertLayer` (its attention a
  :class:`ModernBertAttention` on the kernels whatever ``attn_implementation`` the model has);
* the remaining ``nn.LayerNorm`` and GELU activation modules -> :class:`fastbert.nn.LayerNorm` /
  :class:`fastbert.nn.GELU`; DeBERTa's own ``DebertaLayerNorm`` -> :class:`DebertaLayerNorm`.

Left with a reason: decoders (causal self-attention, KV cache, cross-attention), relative position
embeddings (BERT's ``position_embedding_type``), flex_attention's BlockMask masks, non-GELU activations (applied unfused), and modules
of other model families. With ``output_attentions=True`` or a ``head_mask`` the swapped attention
computes its weights through the explicit reference path
(:func:`fastbert.nn.attention.attention_with_weights`).
Chunked feed-forward (``chunk_size_feed_forward``) runs unchunked (same result). A Linear's bias
is fused into the next op only for a plain ``nn.Linear`` without hooks: a LoRA adapter, a quantized
or a hooked Linear in its place (e.g. peft applied after optimize()) is called as it is.

``output_attentions`` / ``output_hidden_states`` with transformers 5.x: the model collects those
outputs with forward hooks that it installs, the first time they are asked for, on the modules of
its own classes named in ``_can_record_outputs`` (e.g. ``BertSelfAttention`` for the attentions,
DistilBERT's ``TransformerBlock`` and ALBERT's ``AlbertLayer`` for the hidden states). A swapped
module is of another class, so :func:`swap_module` gives each replacement the hooks transformers
would install on the module it replaces (:func:`attach_capturing_hooks`: fastbert's modules run
them from their forward while the model collects, so a model that never asks pays nothing; the
original gets them back on :func:`fastbert.restore` if it missed transformers' installation). The swapped attention
computes its weights whenever the model is collecting attentions. Where this transformers has no such hooks
(4.x passes the outputs up through return values instead) nothing needs doing. One case is left:
transformers 4.5x collects ViT's attentions by wrapping ``ViTSelfAttention.forward`` during the
call (not through hooks), which fastbert's module is not, so those come back empty after
optimize() there (``fastbert.restore`` the model for them).
"""
from __future__ import annotations

import importlib
import inspect
import sys
import typing
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from .. import ops, reference
from .._validation import (host_checks_allowed, mask_assert, mask_reads_allowed, tensor_version,
                           type_name)
from ..backends import constant_result
from ..nn import GELU
from ..nn._fuse import add_norm, layer_norm, matmul, unfused_dropout
from ..nn._utils import (NoTorchScript, _own_forward, adopt, check_backend, dropout_rate, plain_linear,
                        runs_plainly, set_own_mode as _set_own_mode)
from ..nn.attention import attention_with_weights
from ..nn.gelu import gelu_approximation

try:  # transformers >= 4.x keeps the checkpointing base class here
    from transformers.modeling_layers import GradientCheckpointingLayer as _LayerBase
except ImportError:  # pragma: no cover - older transformers
    _LayerBase = nn.Module

__all__ = [
    "register",
    "attention_forward",
    "hf_mask_to_sdpa",
    "swap_module",
    "SelfAttention",
    "DenseAddLayerNorm",
    "DenseBiasGELU",
    "MLP",
    "MPNetAttention",
    "DebertaV2SelfAttention",
    "DebertaSelfAttention",
    "DebertaLayerNorm",
    "ModernBertAttention",
    "ModernBertLayer",
    "DistilBertBlock",
    "AlbertLayer",
    "PaddingFreeModel",
    "swap_padding_free",
    "FAMILIES",
]

# Families whose layers are BERT's, copied by transformers into classes of their own name (the
# prefix): self-attention, output sublayers and intermediate are all swapped.
_BERT_LAYOUT = {"bert": "Bert", "roberta": "Roberta", "electra": "Electra",
                "xlm_roberta": "XLMRoberta", "camembert": "Camembert", "data2vec": "Data2VecText",
                "ernie": "Ernie"}
# Pre-LayerNorm variants: BERT's self-attention and (XLM-R XL) intermediate; their output
# sublayers hold no LayerNorm and are left as they are.
_BERT_ATTENTION_ONLY = {"xlm_roberta_xl": "XLMRobertaXL", "roberta_prelayernorm": "RobertaPreLayerNorm"}
# Families whose output sublayers and intermediate are BERT's but whose attention is their own
# (relative-position scores; swapped by modules of their own).
_BERT_SUBLAYERS = {"mpnet": "MPNet", "deberta_v2": "DebertaV2", "deberta": "Deberta"}
FAMILIES = (tuple(_BERT_LAYOUT) + ("distilbert", "albert", "vit") + tuple(_BERT_ATTENTION_ONLY)
            + tuple(_BERT_SUBLAYERS) + ("modernbert",))


# ----------------------------------------------------------------------------------------------
# Masks and the "fastbert" attention implementation
# ----------------------------------------------------------------------------------------------
def hf_mask_to_sdpa(mask) -> Optional[Tensor]:
    """Any attention mask a HuggingFace model hands its attention layers -> fastbert's convention.

    * None -> None;
    * 2-D (B, Lk), 1/True = real token (DistilBERT eager in 4.x, flash-attention paths) -> bool
      (B, 1, 1, Lk), True = attend;
    * 4-D (or 3-D (B, Lq, Lk)) bool, True = attend ("sdpa" masks) -> unchanged;
    * 4-D floating, added to the scores ("eager" masks: 0 or the dtype's min) -> unchanged;
    * 4-D integer, nonzero = attend -> bool.

    Anything else (e.g. flex_attention's BlockMask) raises NotImplementedError.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise NotImplementedError(f"fastbert cannot use an attention mask of type {type(mask).__name__} "
                                  "(e.g. flex_attention's BlockMask); load the model with "
                                  "attn_implementation='sdpa', 'eager' or 'fastbert'")
    if mask.dim() == 2:
        return mask.bool()[:, None, None, :]
    if mask.dim() == 3:
        mask = mask[:, None]
    if mask.dim() != 4:
        raise ValueError(f"attention mask must be 2-D (B, Lk) or 4-D (B, 1, Lq, Lk), got shape "
                         f"{tuple(mask.shape)}")
    if mask.dtype == torch.bool or mask.is_floating_point():
        return mask
    return mask.bool()


# ----------------------------------------------------------------------------------------------
# transformers 5.x output capturing (output_attentions / output_hidden_states through hooks)
# ----------------------------------------------------------------------------------------------
_CAPTURE_MODULE = "transformers.utils.output_capturing"


_CAPTURE_API = []  # [module or None] once looked up


def _capture_api():
    """transformers' output-capturing module (5.x), or None where this transformers has none."""
    if not _CAPTURE_API:
        try:
            mod = importlib.import_module(_CAPTURE_MODULE)
        except ImportError:
            mod = None
        if not (hasattr(mod, "_active_collector") and (
                hasattr(mod, "install_output_capuring_hook")
                or hasattr(mod, "install_output_capturing_hook"))):
            mod = None
        _CAPTURE_API.append(mod)
    return _CAPTURE_API[0]


def _collected() -> Optional[dict]:
    """The output collector of the transformers 5.x forward running now, or None."""
    api = _capture_api()
    return None if api is None else api._active_collector.get()


def collecting(key: str) -> bool:
    """Whether a transformers 5.x model is collecting ``key`` ("attentions", "hidden_states") in
    the forward running now (its ``output_attentions=True`` etc. reach the layers only this way)."""
    collected = _collected()
    return collected is not None and key in collected


def _capture_specs(module: nn.Module) -> List[Tuple[str, int, bool]]:
    """What transformers 5.x's output capturing records from ``module``: ``(key, index,
    capture_initial_hidden_state)`` for each entry of the ``_can_record_outputs`` of the model
    classes of ``module``'s family (the classes of its modeling file) whose target class
    ``module`` is an instance of. Empty where this transformers captures no outputs by hooks.
    Entries that match by module path (``class_name`` / ``layer_name``, multimodal models) are not
    followed."""
    api = _capture_api()
    source = sys.modules.get(type(module).__module__)
    if api is None or source is None:
        return []
    recorder = getattr(api, "OutputRecorder", None)
    seen, specs = set(), []
    for obj in list(vars(source).values()):
        flags = getattr(obj, "_can_record_outputs", None) if isinstance(obj, type) else None
        if not isinstance(flags, dict) or id(flags) in seen:
            continue
        seen.add(id(flags))
        for key, entries in flags.items():
            for entry in entries if isinstance(entries, list) else [entries]:
                if recorder is not None and isinstance(entry, recorder):
                    if getattr(entry, "layer_name", None) is not None:
                        continue
                    target, index = entry.target_class, entry.index
                    initial = getattr(entry, "capture_initial_hidden_state", True)
                else:
                    target, index, initial = entry, 0 if "hidden_states" in key else 1, True
                if isinstance(target, type) and isinstance(module, target):
                    spec = (key, int(index), bool(initial))
                    if spec not in specs:
                        specs.append(spec)
    return specs


class _CapturingHook:
    """The forward hook transformers 5.x's output capturing would put on the module a fastbert
    module replaces (e.g. ``BertSelfAttention`` for the attentions, DistilBERT's
    ``TransformerBlock`` for the hidden states): it records ``output[index]`` under ``key`` while the
    model collects that key. The recording is transformers' own hook function, built here (never
    while torch.compile traces a forward: registering a hook there breaks the graph); this wrapper
    pickles (transformers' hooks are closures, which do not) and builds it again when unpickled."""

    def __init__(self, key: str, index: int, initial: bool):
        self.key, self.index, self.initial = key, index, initial
        self._fn = self._build()

    def _build(self):
        api = _capture_api()
        install = getattr(api, "install_output_capuring_hook", None) or \
            getattr(api, "install_output_capturing_hook")
        scratch = nn.Module()
        install(scratch, self.key, self.index, self.initial)
        return next(iter(scratch._forward_hooks.values()))

    def __call__(self, module, args, output):
        return self._fn(module, args, output)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_fn"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fn = self._build()

    def __repr__(self) -> str:
        return f"_CapturingHook({self.key!r}, index={self.index})"


def _is_capturing(hook) -> bool:
    return isinstance(hook, _CapturingHook) or getattr(hook, "__module__", None) == _CAPTURE_MODULE


def _capturing_hooks(module: nn.Module) -> list:
    """The output-capturing hooks of ``module``: fastbert's (kept on the module, or registered as
    forward hooks), and transformers' own."""
    return list(module.__dict__.get("_fastbert_captures", ())) + [
        h for h in module._forward_hooks.values() if _is_capturing(h)]


def attach_capturing_hooks(original: nn.Module, new: nn.Module) -> None:
    """Give ``new``, which replaces ``original``, the output-capturing hooks transformers 5.x would
    install on ``original`` (it installs them by class, and ``new`` is of another class). fastbert's
    own modules run them from their forward, and only while the model collects outputs (as
    transformers installs its hooks only once they are asked for: a forward hook would cost every
    call); any other module gets forward hooks. A no-op where there are none, or ``new`` has them."""
    if _capturing_hooks(new):
        return
    hooks = [_CapturingHook(*spec) for spec in _capture_specs(original)]
    if not hooks:
        return
    if getattr(type(new), "_fastbert_records_outputs", False):
        new._fastbert_captures = hooks
    else:
        for hook in hooks:
            new.register_forward_hook(hook)


def restore_capturing_hooks(model: nn.Module, original: nn.Module, replacement: nn.Module) -> None:
    """For :func:`fastbert.restore`: ``original`` goes back in place of ``replacement``. If
    transformers installed its hooks on ``model`` while ``original`` was out of it (they are
    installed once, the first time outputs are collected), ``original`` missed them: it gets the
    replacement's."""
    if not any(getattr(m, "_output_capturing_hooks_installed", False) for m in model.modules()):
        return
    for name, new in replacement.named_modules():  # a swapped block holds a swapped attention
        try:
            old = original.get_submodule(name)
        except AttributeError:
            continue
        if old is not new and not _capturing_hooks(old):
            for hook in _capturing_hooks(new):
                old.register_forward_hook(hook)


def _record_outputs(module: nn.Module, args: tuple, output) -> None:
    """While the model collects outputs, run the capturing hooks ``module`` keeps (see
    :func:`attach_capturing_hooks`) as transformers runs its hooks: on the call's positional
    arguments and output (also for an attention a fused block computes without calling it)."""
    captures = module.__dict__.get("_fastbert_captures")
    if captures and _collected() is not None:
        for hook in captures:
            hook(module, args, output)


_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _no_padding(mask: Tensor, length: int, window: Optional[Tuple[int, int]] = None) -> bool:
    """Whether an SDPA-convention mask (bool True = attend, or float added) of one packed row only
    restates full or causal attention over it (no padding, nothing between sequences), within the
    sliding ``window`` the attention applies anyway (ModernBERT's local layers get its band)."""
    m = mask.reshape(-1, *mask.shape[-2:]) if mask.dim() >= 2 else mask
    if mask.dim() < 2 or tuple(m.shape[-2:]) != (length, length) or m.shape[0] != 1:
        return False
    m = m[0]
    full = torch.ones(length, length, dtype=torch.bool, device=m.device)
    if window is not None:
        full = reference.window_mask(window, length, length, m.device)
    causal = full.tril()
    if m.dtype == torch.bool:
        return bool(torch.equal(m, full)) or bool(torch.equal(m, causal))
    keep = m == 0
    return (torch.equal(keep, full) or torch.equal(keep, causal)) and bool(torch.isneginf(m[~keep]).all())


# The last packed layout worked out: every layer of a model gets the same position_ids /
# cu_seq_lens tensor, so its lengths are read on the host once per forward, not once per layer.
_PACKED_CACHE: Dict[str, object] = {}


def _packed_sequences(query: Tensor, key: Tensor, mask: Optional[Tensor], kwargs: dict,
                      window: Optional[Tuple[int, int]] = None):
    """(cu_seqlens_q, cu_seqlens_k, max_q, max_k) when transformers hands the attention a row of
    packed sequences, as its flash-attention path reads them: the four varlen keyword arguments
    (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``), or, without a mask, batch 1
    and ``position_ids`` restarting at their minimum at each sequence (the collator's default);
    None otherwise."""
    source = kwargs.get("cu_seq_lens_q")
    if source is None:
        source = kwargs.get("position_ids")
    if not isinstance(source, Tensor) or torch.compiler.is_compiling():
        return _packed_layout(query, key, mask, kwargs, window)
    # Keyed on the very tensor objects (weak references) and their contents' versions: the source
    # of the lengths and the mask, whose values decide whether it masks tokens (transformers gives
    # every layer of one forward the same mask object). Inference tensors have no version counter:
    # one written in place between two calls, under inference_mode, is not seen.
    cache_key = (_tensor_key(source), _tensor_key(mask), tuple(query.shape), key.shape[2], window)
    hit = _PACKED_CACHE.get("entry")
    if (hit is not None and hit[0]() is source and hit[1] == cache_key
            and (mask is None or hit[2]() is mask)):
        return hit[3]
    result = _packed_layout(query, key, mask, kwargs, window)
    _PACKED_CACHE["entry"] = (weakref.ref(source), cache_key,
                              None if mask is None else weakref.ref(mask), result)
    return result


def _tensor_key(t: Optional[Tensor]) -> Optional[tuple]:
    if t is None:
        return None
    return (t.data_ptr(), tensor_version(t), tuple(t.shape), t.dtype)


def _packed_layout(query: Tensor, key: Tensor, mask: Optional[Tensor], kwargs: dict,
                   window: Optional[Tuple[int, int]] = None):
    given = [kwargs.get(name) for name in _VARLEN_KWARGS]
    length = query.shape[2]
    if all(g is not None for g in given):
        if query.shape[0] != 1:
            raise ValueError(f"cu_seq_lens_q: packed sequences come as one row (batch size 1), got a "
                             f"batch of {query.shape[0]}")
        if mask is not None and not _no_padding(mask, length, window):
            raise ValueError("cu_seq_lens_q with an attention mask that masks tokens: pass packed "
                             "sequences without padding, or a padded batch without cu_seq_lens")
        cu_q, cu_k, max_q, max_k = given
        return cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k)
    pos = kwargs.get("position_ids")
    if (query.shape[0] != 1 or length < 2 or key.shape[2] != length
            or not isinstance(pos, Tensor) or pos.numel() != length
            or not host_checks_allowed(query.device)):
        return None  # (traced or captured: attention_forward masks by position ids instead)
    start, packed = _sequence_starts(pos.reshape(-1))
    if not bool(packed) or int(start.sum()) == 1:
        return None  # one sequence
    if mask is not None and not _no_padding(mask, length, window):
        # padding, or a mask between the sequences: the attention as the model masks it. A mask
        # that only restates causal attention over the row, within the window (what transformers
        # builds for sliding-window layers, where the others get none) still packs, so that
        # every layer of such a model keeps the sequences apart (checked after the O(L) position
        # ids, so that a row of one sequence never pays the O(L^2) mask comparison)
        return None
    starts = start.nonzero().view(-1).to(torch.int32)
    cu = torch.cat([starts, starts.new_full((1,), length)])
    longest = int((cu[1:] - cu[:-1]).max())
    return cu, cu, longest, longest


def _sequence_starts(pos: Tensor) -> Tuple[Tensor, Tensor]:
    """A batch-1 row of position ids (L,) -> (where a sequence starts (L,) bool, whether the row
    reads as packed sequences at all (0-d bool)), without a host read. Packed is
    DataCollatorWithFlattening's layout: sequences back to back, each counting up by one from the
    row's smallest id, the first at index 0. Any other row (shuffled or offset ids, say) is one
    sequence that takes its ids as given, as "sdpa" and "eager" take them."""
    start = pos == pos.min()
    steps = (pos[1:] - pos[:-1] == 1) | start[1:]
    return start, start[0] & steps.all()


def _position_ids_mask(query: Tensor, key: Tensor, pos, causal: bool) -> Optional[Tensor]:
    """Under torch.compile or CUDA-graph capture, where the packed lengths cannot be read on the
    host: a batch-1 row whose ``position_ids`` may restart gets a (1, 1, L, L) bool mask keeping
    each token to the keys of its own sequence (causal within it for a causal module), built on
    the device; for one sequence it keeps what attention keeps anyway. None where it does not
    apply."""
    length = query.shape[2]
    if (query.shape[0] != 1 or length < 2 or key.shape[2] != length or not isinstance(pos, Tensor)
            or pos.numel() != length):
        return None
    start, packed = _sequence_starts(pos.reshape(-1))
    seq = torch.cumsum(start.to(torch.int32), 0) * packed  # sequence number of each token
    index = torch.arange(length, device=query.device)  # within one sequence, order is its order
    return _same_sequence_mask(seq, seq, index, index, causal)


def _same_sequence_mask(seq_q: Tensor, seq_k: Tensor, pos_q: Tensor, pos_k: Tensor, causal: bool) -> Tensor:
    """(1, 1, Lq, Lk) bool mask keeping query i to the keys of its own sequence (seq_q[i] ==
    seq_k[j]), and for ``causal`` to those whose position in it is not after its own (top-left
    aligned: pos_* count from each sequence's start, or from any origin the two share)."""
    keep = seq_q[:, None] == seq_k[None, :]
    if causal:
        keep = keep & (pos_k[None, :] <= pos_q[:, None])
    return keep[None, None]


# transformers 4.x had head masks (multiplying the attention probabilities per head); 5.x removed
# them: its models take a head_mask argument through **kwargs and ignore it, and so do the swapped
# modules there.
_HEAD_MASKS = int(transformers.__version__.split(".")[0]) < 5


def _head_mask(a: Dict[str, object]) -> Optional[Tensor]:
    return a.get("head_mask") if _HEAD_MASKS else None


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0,
                      scaling: Optional[float] = None, is_causal: Optional[bool] = None, *,
                      backend: Optional[str] = None, **kwargs) -> Tuple[Tensor, Optional[Tensor]]:
    """The ``"fastbert"`` attention function (transformers' ``AttentionInterface`` signature).

    Shapes: query (B, H, Lq, D), key/value (B, H_kv, Lk, D) (H a multiple of H_kv: grouped-query
    attention, read in place by the kernels; repeated only for the weights path),
    ``attention_mask`` as accepted by :func:`hf_mask_to_sdpa` ->
    (out (B, Lq, H, D), weights or None). As transformers' "sdpa": causal (``is_causal``, else the
    module's ``is_causal``) only when the model gives no mask and for Lq > 1; ``position_bias``
    (T5-style) is added to the scores (and does not count as a mask: T5's decoder stays causal); ``output_attentions=True`` (or transformers 5.x collecting attentions)
    returns the weights, computed through the explicit reference path (a model that tells its
    attention function neither, as GPT-2 and ViT in transformers 4.x, gets None, as with
    flash-attention). A transformers 4.x head mask (GPT-2's ``head_mask``, or ViT's in the mask's
    place) multiplies each head's probabilities, as in their eager path. Attention sinks
    (``s_aux``, GPT-OSS) and logit soft-capping (``softcap``, Gemma 2) are refused with
    NotImplementedError rather than dropped. ``sliding_window`` (ModernBERT's local layers,
    Mistral-style models) becomes ``window_size = (sliding_window - 1,) * 2``, as transformers'
    flash-attention path maps it, so the kernels skip the key blocks outside the window (the mask
    transformers builds for those layers holds the same window).

    Packed sequences (padding-free training with ``DataCollatorWithFlattening``), as transformers'
    flash-attention path takes them: batch 1 with ``cu_seq_lens_q`` / ``cu_seq_lens_k`` /
    ``max_length_q`` / ``max_length_k``, or ``position_ids`` that restart at each sequence, without
    a mask or with one that only restates causal attention within the layer's sliding window. Each sequence then attends only to itself (causal within it for a causal module)
    through :func:`fastbert.varlen_attention`; the weights path masks across sequences.
    """
    for name, what in (("s_aux", "attention sinks"), ("softcap", "logit soft-capping")):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"attn_implementation='fastbert': {what} ({name}=...) are not "
                                      "supported by fastbert's kernels; load this model with "
                                      "attn_implementation='eager'")
    head_mask = kwargs.get("head_mask")  # transformers 4.x passing it on (GPT-2)
    if (_HEAD_MASKS and head_mask is None and isinstance(attention_mask, Tensor)
            and attention_mask.is_floating_point() and attention_mask.dim() == 4
            and tuple(attention_mask.shape[-2:]) == (1, 1) and key.shape[2] > 1):
        # ViT and its copies in transformers 4.x pass the head mask where the mask goes (their
        # eager function multiplies the probabilities by it); an additive mask of that shape
        # would add one constant per row, which softmax ignores
        head_mask, attention_mask = attention_mask, None
    want_weights = bool(kwargs.get("output_attentions", False)) or collecting("attentions")
    gqa = key.shape[1] != query.shape[1]
    sliding_window = kwargs.get("sliding_window")
    window = None
    if sliding_window is not None and key.shape[2] > sliding_window:
        window = (sliding_window - 1, sliding_window - 1)
    mask = _with_score_bias(attention_mask, kwargs.get("position_bias"))
    if is_causal is None:
        is_causal = getattr(module, "is_causal", False)
    packed = (_packed_sequences(query, key, mask, kwargs, window)
              if kwargs.get("position_bias") is None else None)
    if packed is not None:
        mask = None  # full or causal attention within each sequence, as _packed_sequences checked
    elif mask is None and not host_checks_allowed(query.device):
        mask = _position_ids_mask(query, key, kwargs.get("position_ids"), bool(is_causal))
    # causal as transformers' sdpa decides it: from the model's own mask, not from the T5-style
    # position_bias merged into ``mask`` above (a decoder given a bias and no mask is still causal;
    # the kernels take is_causal together with a float mask), nor from the position-ids mask,
    # which is causal already where the module is; packed sequences are causal within each one
    # where the module is (their mask, if any, only restated that)
    causal = (bool(is_causal) and (attention_mask is None or packed is not None)
              and query.shape[2] > 1)
    if packed is not None and not want_weights and head_mask is None:
        cu_q, cu_k, max_q, max_k = packed
        out = ops.varlen_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                                   cu_q, cu_k, max_q, max_k, dropout_p=dropout, is_causal=causal,
                                   scale=scaling, window_size=window, backend=backend)
        return out.unsqueeze(0), None  # (1, T, H, Dv)
    if packed is not None:  # the weights path: a mask that keeps each sequence to itself
        seqs = []
        for cu, length in ((packed[0].long(), query.shape[2]), (packed[1].long(), key.shape[2])):
            seq = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=query.device), cu[1:] - cu[:-1])
            seqs += [seq, torch.arange(length, device=query.device) - cu[seq]]  # and local positions
        mask, causal = _same_sequence_mask(seqs[0], seqs[2], seqs[1], seqs[3], causal), False
    if want_weights:
        if gqa:
            key, value = reference.repeat_kv_heads(key, value, query.shape[1], dim=1)
        if window is not None:
            mask = reference.with_window(mask, window, query.shape[2], key.shape[2], query.device)
        out, weights = attention_with_weights(query, key, value, mask, dropout, is_causal=causal,
                                              scale=scaling)
    else:
        out = ops.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                               is_causal=causal, scale=scaling, enable_gqa=gqa,
                                               window_size=window, backend=backend)
        weights = None
    if head_mask is not None:  # (B or 1, H, 1, 1) on the probabilities: on P V as well
        out = out * head_mask
        weights = None if weights is None else weights * head_mask
    return out.transpose(1, 2).contiguous(), weights


def register(name: str = "fastbert", *, backend: Optional[str] = None) -> None:
    """Register ``name`` as an attention implementation usable with
    ``from_pretrained(..., attn_implementation=name)`` / ``from_config``.

    Registers :func:`attention_forward` (with ``backend`` bound) with ``AttentionInterface`` and,
    where transformers has it (``transformers.masking_utils.AttentionMaskInterface``, 4.53+), the
    "sdpa" mask builder under the same name, so padding masks reach the attention (an encoder's
    as one (B, 1, 1, Lk) row shared by every query, not expanded to (B, 1, Lq, Lk)). Models whose
    attention does not go through ``AttentionInterface`` (e.g. BERT in transformers 4.57, MPNet
    and DeBERTa in 5.x) run their own attention under the name, with the mask their eager
    attention expects: use :func:`fastbert.optimize` there. Called on import with the defaults.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    backend = check_backend(backend)

    def fastbert_attention(module, query, key, value, attention_mask, **kwargs):
        return attention_forward(module, query, key, value, attention_mask, backend=backend, **kwargs)

    fastbert_attention.__doc__ = attention_forward.__doc__
    attention_interface = getattr(transformers, "AttentionInterface", None)
    if attention_interface is None:  # pragma: no cover - transformers < 4.48
        raise RuntimeError(f"transformers {transformers.__version__} has no AttentionInterface; "
                           "use fastbert.optimize(model) instead")
    attention_interface.register(name, fastbert_attention)
    try:
        from transformers import masking_utils
        from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
    except ImportError:  # pragma: no cover - transformers < 4.53
        return
    # transformers 5.x: encoders' full attention plus padding (absent from 4.x)
    bidirectional = getattr(masking_utils, "bidirectional_mask_function", None)

    def fastbert_mask(*args, config=None, **kwargs):
        # transformers accepts the name for any model; one whose attention ignores the interface
        # (MPNet, DeBERTa, MegatronBERT, RoFormer, ...) adds the mask to its own eager scores, so
        # it gets the eager (additive float) mask: a bool one would add 1 and mask nothing
        model_type = getattr(config, "model_type", None)
        if isinstance(model_type, str) and not _dispatches_attention(model_type):
            return eager_mask(*args, config=config, **kwargs)
        if (bidirectional is not None and kwargs.get("mask_function") is bidirectional
                and "q_length" in kwargs and kwargs.get("allow_is_bidirectional_skip")):
            # every query row of an encoder's padding mask is the same: build one, (B, 1, 1, Lk),
            # which the kernels read with a zero query stride, instead of (B, 1, Lq, Lk) (512 MiB
            # at B = 8, L = 8192 against 64 KiB). Only where transformers would accept no mask at
            # all: a caller that asks for the mask always (allow_is_bidirectional_skip=False)
            # reuses it whole, e.g. T5Gemma2's decoder concatenates its cross-attention mask with
            # its (B, 1, Lq, Lq) self-attention mask.
            kwargs.update(q_length=1, q_offset=0)
        return sdpa_mask(*args, config=config, **kwargs)

    AttentionMaskInterface.register(name, fastbert_mask)


_DISPATCHES_ATTENTION: Dict[str, bool] = {}


@constant_result
def _dispatches_attention(model_type: str) -> bool:
    """Whether the HuggingFace model of ``model_type`` runs its attention through
    ``AttentionInterface`` (transformers' own test: ``_can_set_attn_implementation``); True for
    a model transformers does not map (a custom one: its attention is its author's choice)."""
    if model_type not in _DISPATCHES_ATTENTION:
        answer = True
        try:
            from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
            cls = getattr(transformers, MODEL_MAPPING_NAMES.get(model_type) or "", None)
            check = getattr(cls, "_can_set_attn_implementation", None)
            if check is not None:
                answer = bool(check())
        except Exception:  # an older transformers without these names: keep the sdpa mask
            pass
        _DISPATCHES_ATTENTION[model_type] = answer
    return _DISPATCHES_ATTENTION[model_type]


# ----------------------------------------------------------------------------------------------
# Swapped modules
# ----------------------------------------------------------------------------------------------
def _arg_names(cls) -> Tuple[str, ...]:
    """Names of ``cls.forward``'s parameters after ``self`` that can be passed positionally."""
    params = list(inspect.signature(cls.forward).parameters.values())[1:]
    return tuple(p.name for p in params
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _bind(names: Tuple[str, ...], args, kwargs) -> Dict[str, object]:
    if len(args) > len(names):
        raise TypeError(f"forward() takes {len(names)} positional arguments but {len(args)} were given")
    bound = dict(zip(names, args))
    for k, v in kwargs.items():
        if k in bound:
            raise TypeError(f"forward() got multiple values for argument {k!r}")
        bound[k] = v
    return bound


def _probs_dropout_p(module: nn.Module, attr: str, called: bool) -> float:
    """The attention-probability dropout rate of ``module`` as the original applies it: a Dropout
    module the original calls on the probabilities (``called``: MPNet, DeBERTa) acts in its own
    training mode; a rate handed to an attention function (BERT and the rest in transformers 5.x)
    in ``module``'s."""
    value = getattr(module, attr)
    if called and isinstance(value, nn.Dropout):
        return float(value.p) if value.training else 0.0
    return float(value.p if isinstance(value, nn.Dropout) else value) if module.training else 0.0


@dataclass(frozen=True)
class _AttentionSpec:
    q: str
    k: str
    v: str
    heads: str                      # attribute with the number of heads
    head_dim: str                   # attribute with the head size
    dropout: str                    # attention-probability dropout: nn.Dropout or float attribute
    out: Optional[str] = None       # output projection inside the module
    norm: Optional[str] = None      # ALBERT: LayerNorm(hidden + dropout(out(ctx)))
    out_dropout: Optional[str] = None
    legacy_tuple: bool = False      # 4.x DistilBERT / ALBERT: returns (out,) or (out, weights)
    dropout_called: bool = False    # the original calls the dropout module (see _probs_dropout_p)


_BERT_ATTN = _AttentionSpec("query", "key", "value", "num_attention_heads", "attention_head_size", "dropout")
_ATTENTION_SPECS = {
    **{(family, f"{prefix}{kind}SelfAttention"): _BERT_ATTN
       for family, prefix in {**_BERT_LAYOUT, **_BERT_ATTENTION_ONLY}.items() for kind in ("", "Sdpa")},
    ("vit", "ViTSelfAttention"): _AttentionSpec("query", "key", "value", "num_attention_heads",
                                                "attention_head_size", "dropout_prob"),
    ("vit", "ViTAttention"): _AttentionSpec("q_proj", "k_proj", "v_proj", "num_attention_heads",
                                            "head_dim", "attention_dropout", out="o_proj"),
    ("albert", "AlbertAttention"): _AttentionSpec("query", "key", "value", "num_attention_heads",
                                                  "attention_head_size", "attention_dropout",
                                                  out="dense", norm="LayerNorm",
                                                  out_dropout="output_dropout", legacy_tuple=True),
    ("albert", "AlbertSdpaAttention"): _AttentionSpec("query", "key", "value", "num_attention_heads",
                                                      "attention_head_size", "attention_dropout",
                                                      out="dense", norm="LayerNorm",
                                                      out_dropout="output_dropout", legacy_tuple=True),
}
for _cls in ("MultiHeadSelfAttention", "DistilBertSdpaAttention", "DistilBertFlashAttention2",
             "DistilBertSelfAttention"):
    _ATTENTION_SPECS[("distilbert", _cls)] = _AttentionSpec(
        "q_lin", "k_lin", "v_lin", "n_heads", "attention_head_size", "dropout", out="out_lin",
        legacy_tuple=True)


def _spec_children(spec: _AttentionSpec):
    return [n for n in (spec.q, spec.k, spec.v, spec.out, spec.norm) if n is not None]


def _attention_refusal(module: nn.Module, spec: _AttentionSpec) -> Optional[str]:
    for name in _spec_children(spec):
        if not isinstance(getattr(module, name, None), (nn.Linear, nn.LayerNorm)):
            return f"expected a Linear/LayerNorm submodule {name!r}: unknown transformers version"
    for name in (spec.heads, spec.head_dim, spec.dropout):
        if not hasattr(module, name):
            return f"expected an attribute {name!r}: unknown transformers version"
    if getattr(module, "is_decoder", False) or getattr(module, "is_causal", False):
        return "decoder self-attention (causal, KV cache, cross-attention) is not supported"
    pos = getattr(module, "position_embedding_type", "absolute")
    if pos != "absolute":
        return f"position_embedding_type={pos!r} (relative position scores) is not supported"
    config = getattr(module, "config", None)
    if getattr(config, "_attn_implementation", None) == "flex_attention":
        return "flex_attention passes BlockMask masks; load the model with attn_implementation='sdpa'"
    used = tuple(n + "." for n in _spec_children(spec))
    unused = [n for n, _ in module.named_parameters() if not n.startswith(used)]
    unused += [n for n, _ in module.named_buffers() if not n.startswith(used)]
    if unused:
        return f"has parameters fastbert would not use: {unused}"
    return None


def _project_qkv(owner: nn.Module, spec: _AttentionSpec, hidden: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The query, key and value projections of ``owner`` named by ``spec``: hidden (B, L, E) ->
    3 x (B, H, L, D) (views of one matmul on the concatenated weights where possible)."""
    b, length, _ = hidden.shape
    h, d = int(getattr(owner, spec.heads)), int(getattr(owner, spec.head_dim))
    lins = [getattr(owner, name) for name in (spec.q, spec.k, spec.v)]
    if all(plain_linear(lin) for lin in lins) and len({lin.bias is None for lin in lins}) == 1:
        # one matmul on the concatenated weights: [B, L, E] @ [E, 3HD] -> [B, L, 3, H, D]
        w = torch.cat([lin.weight for lin in lins])
        bias = None if lins[0].bias is None else torch.cat([lin.bias for lin in lins])
        qkv = F.linear(hidden, w, bias).view(b, length, 3, h, d)
    else:  # each projection as it is (a LoRA adapter or a hook on one of them, say)
        qkv = torch.stack([lin(hidden) for lin in lins], dim=2).view(b, length, 3, h, d)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))
    return q, k, v


def _attention(q: Tensor, k: Tensor, v: Tensor, mask, dropout_p: float, scale: float,
               head_mask: Optional[Tensor], need_weights: bool,
               backend: Optional[str]) -> Tuple[Tensor, Optional[Tensor]]:
    """q, k, v (B, H, L, D) -> (context (B, L, H * D), weights (B, H, Lq, Lk) when ``need_weights``
    or ``head_mask`` is given (computed by the explicit path), else None). ``mask``: any HF mask
    (:func:`hf_mask_to_sdpa`), or a float score bias."""
    sdpa_mask = hf_mask_to_sdpa(mask)
    if need_weights or head_mask is not None:
        out, weights = attention_with_weights(q, k, v, sdpa_mask, dropout_p, scale=scale,
                                              head_mask=head_mask)
    else:
        out = ops.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, dropout_p=dropout_p,
                                               scale=scale, backend=backend)
        weights = None
    b, h, length, d = out.shape
    return out.transpose(1, 2).reshape(b, length, h * d), weights


def _attend(owner: nn.Module, spec: _AttentionSpec, backend: Optional[str], hidden: Tensor, mask,
            head_mask: Optional[Tensor], need_weights: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """Self-attention with the projections of ``owner`` named by ``spec``: hidden (B, L, E) ->
    (context (B, L, H * D) before any output projection, weights (B, H, L, L) when
    ``need_weights`` or ``head_mask`` is given, else None). ``mask``: any HF mask
    (:func:`hf_mask_to_sdpa`), or a float (B, H, L, L) score bias."""
    q, k, v = _project_qkv(owner, spec, hidden)
    p = _probs_dropout_p(owner, spec.dropout, spec.dropout_called)
    return _attention(q, k, v, mask, p, q.shape[-1] ** -0.5, head_mask, need_weights, backend)


class SelfAttention(nn.Module, NoTorchScript):
    """A HuggingFace self-attention module (BERT, RoBERTa, ELECTRA, DistilBERT, ALBERT, ViT) on
    :func:`fastbert.scaled_dot_product_attention`.

    Built by :func:`swap_module` from the original module, whose attributes, submodules and
    Parameter objects it takes over (same ``state_dict``). Its ``forward`` accepts the original
    class's arguments (transformers 4.57 and 5.x conventions) and returns what the original
    returns; masks as :func:`hf_mask_to_sdpa`. In ALBERT it also runs the output sublayer
    (dense -> dropout -> residual + LayerNorm) as one :func:`fastbert.add_layer_norm`.
    """

    _fastbert_records_outputs = True  # runs its capturing hooks itself (attach_capturing_hooks)
    _fastbert_spec: _AttentionSpec
    _fastbert_args: Tuple[str, ...]
    _fastbert_legacy: bool
    backend: Optional[str]

    def context(self, hidden: Tensor, mask=None, head_mask: Optional[Tensor] = None,
                need_weights: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """hidden (B, L, E) -> (context (B, L, H * D) before any output projection, weights
        (B, H, L, L) when ``need_weights`` or ``head_mask`` is given, else None)."""
        return _attend(self, self._fastbert_spec, self.backend, hidden, mask, head_mask, need_weights)

    def forward(self, *args, **kwargs):
        a = _bind(self._fastbert_args, args, kwargs)
        hidden = a.get("hidden_states", a.get("query"))
        if hidden is None:
            raise TypeError("missing the hidden states (hidden_states / query)")
        if ("key" in a and a["key"] is not hidden) or ("value" in a and a["value"] is not hidden):
            raise NotImplementedError("fastbert's HuggingFace attention is self-attention only")
        for name in ("encoder_hidden_states", "past_key_values", "past_key_value"):
            if a.get(name) is not None:
                raise NotImplementedError(f"{name} (cross-attention / KV cache) is not supported by "
                                          "fastbert's swapped attention; fastbert.restore(model)")
        # 5.x: the weights are asked for through the model's output collector
        want_weights = bool(a.get("output_attentions", False)) or collecting("attentions")
        mask = a.get("attention_mask", a.get("mask"))
        ctx, weights = self.context(hidden, mask, _head_mask(a), want_weights)
        spec = self._fastbert_spec
        if spec.norm is not None:
            out = _linear_add_norm(ctx, getattr(self, spec.out), hidden, getattr(self, spec.norm),
                                   getattr(self, spec.out_dropout),
                                   self.backend)
        elif spec.out is not None:
            out = getattr(self, spec.out)(ctx)
        else:
            out = ctx
        if self._fastbert_legacy:
            return (out, weights) if want_weights else (out,)
        _record_outputs(self, args, (out, weights))
        return out, weights


def _deberta_mask(a) -> Optional[Tensor]:
    """DeBERTa's attention mask as its attention reads it, whatever its dtype: nonzero = attend
    (``attention_mask.bool()``; its encoder builds it in the user's mask dtype, so a float 0/1 mask
    arrives as 0/1, which as an additive mask would not mask anything)."""
    mask = a.get("attention_mask")
    return mask.bool() if isinstance(mask, Tensor) else mask


def _deberta_rows_without_keys(ctx: Tensor, weights: Optional[Tensor], v: Tensor,
                               mask: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """DeBERTa masks padded query rows too (its mask is the outer product of the padding mask)
    and fills masked scores with ``finfo.min`` before the softmax, so such a row averages every
    value uniformly (weights 1 / L); the kernels give a row without keys 0. Made as
    transformers makes them: the heads of a question-answering or left-padded model read those
    positions (without this, losses and gradients differed, by 1e12 in a freshly initialised
    DeBERTa-v2 whose zero row met a zero LayerNorm input). ctx (B, L, H * D), weights
    (B, H, L, L) or None, v (B, H, L, D), mask the bool DeBERTa mask (B, 1, L, L) or None. With
    dropout, those rows take the mean without it (transformers drops some of their weights)."""
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return ctx, weights
    has_key = mask.any(-1)[:, 0, :, None]  # (B, L, 1)
    b, h, length, d = v.shape
    mean = v.mean(-2).reshape(b, 1, h * d)
    ctx = torch.where(has_key, ctx, mean.to(ctx.dtype))
    if weights is not None:
        weights = torch.where(has_key[:, None], weights, 1.0 / weights.shape[-1])
    return ctx, weights


def _with_score_bias(mask, bias: Optional[Tensor]):
    """An HF attention mask and a float score bias (B or 1, H, Lq, Lk) as one SDPA mask."""
    mask = hf_mask_to_sdpa(mask)
    if bias is None:
        return mask
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return bias + mask


_MPNET_ATTN = _AttentionSpec("q", "k", "v", "num_attention_heads", "attention_head_size", "dropout",
                             out="o", dropout_called=True)


class MPNetAttention(nn.Module, NoTorchScript):
    """MPNet's ``MPNetAttention``: ``LayerNorm(dropout(o(attention(x))) + x)``, where the scores
    carry the relative-position bias the encoder computes once (``position_bias``, (B, H, L, L)).
    The bias and the padding mask go to :func:`fastbert.scaled_dot_product_attention` as one float
    mask (its gradient reaches the bias table when training); the output projection, dropout,
    residual and LayerNorm run as one :func:`fastbert.add_layer_norm` with ``input_bias = o.bias``.
    Built by :func:`swap_module`; the inner ``attn`` (``MPNetSelfAttention``) is kept as it is, so
    the ``state_dict`` is unchanged. forward: the original's arguments (transformers 4.57 and
    5.x) -> ``(out,)`` or ``(out, weights)`` with ``output_attentions``."""

    _fastbert_records_outputs = True
    _fastbert_args: Tuple[str, ...]
    backend: Optional[str]

    def forward(self, *args, **kwargs):
        a = _bind(self._fastbert_args, args, kwargs)
        hidden = a.get("hidden_states")
        if hidden is None:
            raise TypeError("missing the hidden states (hidden_states)")
        want_weights = bool(a.get("output_attentions", False)) or collecting("attentions")
        mask = _with_score_bias(a.get("attention_mask"), a.get("position_bias"))
        ctx, weights = _attend(self.attn, _MPNET_ATTN, self.backend, hidden, mask, _head_mask(a),
                               want_weights)
        out = _linear_add_norm(ctx, self.attn.o, hidden, self.LayerNorm, self.dropout, self.backend)
        _record_outputs(self, args, (out, weights))
        return (out, weights) if want_weights else (out,)


_DEBERTA_ATTN = _AttentionSpec("query_proj", "key_proj", "value_proj", "num_attention_heads",
                               "attention_head_size", "dropout", dropout_called=True)
# what DeBERTa-v2's attention must have for fastbert's to stand in (the original class's bias
# method is called on the new module)
_DEBERTA_ATTRS = ("pos_att_type", "relative_attention", "num_attention_heads", "attention_head_size")
_DEBERTA_METHODS = ("disentangled_attention_bias", "transpose_for_scores")


class DebertaV2SelfAttention(nn.Module, NoTorchScript):
    """DeBERTa-v2/v3's ``DisentangledSelfAttention`` on :func:`fastbert.scaled_dot_product_attention`.

    The content-to-position and position-to-content scores (the relative-position bias) are
    computed by the original class's ``disentangled_attention_bias`` as in transformers; they and
    the padding mask go to the attention kernel as one float mask (B, H, L, L), whose gradient the
    kernel returns when training. The content-to-content scores, softmax, dropout and the product
    with the values are the fused kernel's (no (B, H, L, L) scores or probabilities in memory
    besides the bias). Built by :func:`swap_module` from the original, whose Parameter objects it
    takes over. forward: the original's arguments -> ``(context (B, L, H * D), weights or None)``.

    DeBERTa masks the padded query rows too (its mask is the outer product of the padding mask);
    transformers gives those rows the mean of the values, and so does this module (see
    :func:`_deberta_rows_without_keys`): the heads that read padded positions see what they saw.
    """

    _fastbert_records_outputs = True
    _fastbert_args: Tuple[str, ...]
    _fastbert_hf_cls: type
    backend: Optional[str]

    def transpose_for_scores(self, x: Tensor, attention_heads: int) -> Tensor:
        # the original's layout helper, which its disentangled_attention_bias calls on ``self``
        return self._fastbert_hf_cls.transpose_for_scores(self, x, attention_heads)

    def forward(self, *args, **kwargs):
        a = _bind(self._fastbert_args, args, kwargs)
        hidden = a.get("hidden_states")
        if hidden is None:
            raise TypeError("missing the hidden states (hidden_states)")
        spec = _DEBERTA_ATTN
        q, k, v = _project_qkv(self, spec, hidden)
        query_states = a.get("query_states")
        if query_states is not None and query_states is not hidden:  # DeBERTa's enhanced mask decoder
            b, length = query_states.shape[:2]
            q = self.query_proj(query_states).view(b, length, q.shape[1], q.shape[3]).transpose(1, 2)
        b, h, lq, d = q.shape
        scale_factor = 1 + ("c2p" in self.pos_att_type) + ("p2c" in self.pos_att_type)
        bias = None
        if self.relative_attention:
            rel_embeddings = self.pos_dropout(a.get("rel_embeddings"))
            bias = self._fastbert_hf_cls.disentangled_attention_bias(
                self, q.reshape(b * h, lq, d), k.reshape(b * h, -1, d), a.get("relative_pos"),
                rel_embeddings, scale_factor)
            if not isinstance(bias, Tensor):  # pos_att_type empty: the method returns 0
                bias = None
            else:
                bias = bias.view(b, h, lq, -1)
        want_weights = bool(a.get("output_attentions", False)) or collecting("attentions")
        p = _probs_dropout_p(self, spec.dropout, spec.dropout_called)
        mask = _deberta_mask(a)
        ctx, weights = _attention(q, k, v, _with_score_bias(mask, bias), p,
                                  (d * scale_factor) ** -0.5, None, want_weights, self.backend)
        ctx, weights = _deberta_rows_without_keys(ctx, weights, v, mask)
        _record_outputs(self, args, (ctx, weights))
        return ctx, weights


# what DeBERTa's (v1) attention must have for fastbert's to stand in
_DEBERTA_V1_ATTRS = ("pos_att_type", "relative_attention", "num_attention_heads", "attention_head_size",
                     "dropout", "in_proj", "q_bias", "v_bias")
_DEBERTA_V1_METHODS = ("disentangled_att_bias", "transpose_for_scores")


class DebertaSelfAttention(nn.Module, NoTorchScript):
    """DeBERTa's (v1) ``DisentangledSelfAttention`` on :func:`fastbert.scaled_dot_product_attention`.

    Queries, keys and values come from the fused ``in_proj`` (one matmul, heads interleaved as in
    transformers) plus ``q_bias`` / ``v_bias``; the content-to-position and position-to-content
    scores are computed by the original class's ``disentangled_att_bias`` and go to the kernel with
    the padding as one float mask (B, H, L, L), scale ``1 / sqrt(D * (1 + len(pos_att_type)))``.
    A call with separate ``query_states`` runs the original forward. Padded query rows: as
    :class:`DebertaV2SelfAttention`. forward: the original's arguments -> ``(context (B, L, H * D),
    weights or None)``.
    """

    _fastbert_records_outputs = True
    _fastbert_args: Tuple[str, ...]
    _fastbert_hf_cls: type
    backend: Optional[str]

    def transpose_for_scores(self, x: Tensor) -> Tensor:
        # the original's layout helper, which its disentangled_att_bias calls on ``self``
        return self._fastbert_hf_cls.transpose_for_scores(self, x)

    def forward(self, *args, **kwargs):
        a = _bind(self._fastbert_args, args, kwargs)
        hidden = a.get("hidden_states")
        if hidden is None:
            raise TypeError("missing the hidden states (hidden_states)")
        query_states = a.get("query_states")
        if query_states is not None and query_states is not hidden:
            return self._fastbert_hf_cls.forward(self, *args, **kwargs)
        q, k, v = self.transpose_for_scores(self.in_proj(hidden)).chunk(3, dim=-1)  # (B, H, L, D)
        q = q + self.transpose_for_scores(self.q_bias[None, None, :])
        v = v + self.transpose_for_scores(self.v_bias[None, None, :])
        d = q.shape[-1]
        scale_factor = 1 + len(self.pos_att_type)
        scale = (d * scale_factor) ** -0.5
        bias = None
        rel_embeddings, relative_pos = a.get("rel_embeddings"), a.get("relative_pos")
        if self.relative_attention and rel_embeddings is not None and relative_pos is not None:
            bias = self._fastbert_hf_cls.disentangled_att_bias(  # from the scaled queries, as there
                self, q * scale, k, relative_pos, self.pos_dropout(rel_embeddings), scale_factor)
            if not isinstance(bias, Tensor):  # pos_att_type empty: the method returns 0
                bias = None
        want_weights = bool(a.get("output_attentions", False)) or collecting("attentions")
        p = _probs_dropout_p(self, "dropout", called=True)
        mask = _deberta_mask(a)
        ctx, weights = _attention(q, k, v, _with_score_bias(mask, bias), p, scale,
                                  None, want_weights, self.backend)
        ctx, weights = _deberta_rows_without_keys(ctx, weights, v, mask)
        _record_outputs(self, args, (ctx, weights))
        return ctx, weights


class ModernBertAttention(nn.Module, NoTorchScript):
    """ModernBERT's attention (transformers 5.x) on fastbert's kernels whatever attention the model
    was loaded with: ``Wqkv`` -> rotary embedding (transformers' own ``apply_rotary_pos_emb``) ->
    :func:`attention_forward` (the local layers' sliding window skipped block-wise) -> ``Wo`` ->
    dropout. Built by :func:`swap_module` (within :class:`ModernBertLayer`); same ``state_dict``.
    forward: the original's arguments -> ``(out (B, L, E), weights or None)``. A local layer always
    applies its window, as transformers' flash-attention path does: given a custom 4-D mask (which
    its sdpa and eager paths use as it is in every layer), the local layers differ from those two.
    """

    _fastbert_records_outputs = True
    _fastbert_rotary: Callable
    backend: Optional[str]

    def forward(self, hidden_states: Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        shape = hidden_states.shape[:-1]
        qkv = self.Wqkv(hidden_states).view(*shape, 3, -1, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=-3))  # 3 x (B, H, L, D)
        cos, sin = position_embeddings
        q, k = self._fastbert_rotary(q, k, cos, sin, unsqueeze_dim=1)
        want_weights = bool(kwargs.get("output_attentions", False)) or collecting("attentions")
        out, weights = attention_forward(
            self, q, k, v, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.head_dim ** -0.5, sliding_window=self.sliding_window,
            output_attentions=want_weights, backend=self.backend)
        out = self.out_drop(self.Wo(out.reshape(*shape, -1)))
        _record_outputs(self, (hidden_states,), (out, weights))
        return out, weights


class ModernBertLayer(_LayerBase, NoTorchScript):
    """ModernBERT's pre-LayerNorm encoder layer (transformers 5.x) with the residual add after the
    attention and the LayerNorm before the MLP fused in one :func:`fastbert.add_layer_norm`
    (``return_residual``), the norms on :func:`fastbert.layer_norm`, the MLP's ``act(input) * gate``
    on :func:`fastbert.geglu` (one pass over the ``Wi`` output, read in place) and the attention a
    :class:`ModernBertAttention`. Same ``state_dict``."""

    _fastbert_records_outputs = True
    backend: Optional[str]

    def forward(self, hidden_states: Tensor, attention_mask=None, position_embeddings=None, **kwargs):
        # (layer_norm calls what is not a plain LayerNorm: layer 0's Identity, a hooked norm)
        attn_out, _ = self.attn(layer_norm(hidden_states, self.attn_norm, self.backend),
                                position_embeddings=position_embeddings,
                                attention_mask=attention_mask, **kwargs)
        mlp = self.mlp
        y, h = add_norm(attn_out, None, None, hidden_states, self.mlp_norm, self.backend,
                        return_residual=True)
        approximate = gelu_approximation(mlp.act)
        if approximate is None or not runs_plainly(mlp, type(mlp)):
            out = h + mlp(y)
        else:
            act = ops.geglu(mlp.Wi(y), None, approximate, backend=self.backend)
            out = h + mlp.Wo(mlp.drop(act))
        _record_outputs(self, (hidden_states,), out)
        return out


def _modernbert_refusal(layer: nn.Module) -> Optional[str]:
    names = _arg_names(type(layer))
    if "position_embeddings" not in names or not callable(
            getattr(sys.modules.get(type(layer).__module__), "apply_rotary_pos_emb", None)):
        return ("this transformers' ModernBERT layer (before 5.x) is not supported; load the model "
                "with transformers 5.x")
    if not (_has(layer, mlp_norm=nn.LayerNorm, attn=nn.Module, mlp=nn.Module)
            and isinstance(layer.attn_norm, (nn.LayerNorm, nn.Identity))
            and _has(layer.attn, Wqkv=nn.Linear, Wo=nn.Linear)
            and _has(layer.mlp, Wi=nn.Linear, Wo=nn.Linear, drop=nn.Dropout)
            and all(hasattr(layer.attn, n) for n in ("head_dim", "sliding_window", "attention_dropout",
                                                     "out_drop"))):
        return "unexpected ModernBertEncoderLayer structure: unknown transformers version"
    if getattr(getattr(layer, "config", None), "_attn_implementation", None) == "flex_attention":
        return "flex_attention passes BlockMask masks; load the model with attn_implementation='sdpa'"
    return None


def _deberta_refusal(module: nn.Module) -> Optional[str]:
    for name in (_DEBERTA_ATTN.q, _DEBERTA_ATTN.k, _DEBERTA_ATTN.v):
        if not isinstance(getattr(module, name, None), nn.Linear):
            return f"expected a Linear submodule {name!r}: unknown transformers version"
    missing = [n for n in _DEBERTA_ATTRS + ("dropout",) if not hasattr(module, n)]
    missing += [n for n in _DEBERTA_METHODS if not callable(getattr(type(module), n, None))]
    if getattr(module, "relative_attention", False) and not hasattr(module, "pos_dropout"):
        missing.append("pos_dropout")
    if missing:
        return f"expected {missing}: unknown transformers version"
    unknown = set(module.pos_att_type) - {"c2p", "p2c"}
    if unknown:
        return f"pos_att_type {sorted(unknown)} is not supported"
    return None


def _deberta_v1_refusal(module: nn.Module) -> Optional[str]:
    missing = [n for n in _DEBERTA_V1_ATTRS if not hasattr(module, n)]
    missing += [n for n in _DEBERTA_V1_METHODS if not callable(getattr(type(module), n, None))]
    if getattr(module, "relative_attention", False) and not hasattr(module, "pos_dropout"):
        missing.append("pos_dropout")
    if missing:
        return f"expected {missing}: unknown transformers version"
    if getattr(module, "head_logits_proj", None) is not None or getattr(module, "talking_head", False):
        return "talking-head attention (mixing the scores across heads) is not supported"
    unknown = set(module.pos_att_type) - {"c2p", "p2c"}
    if unknown:
        return f"pos_att_type {sorted(unknown)} is not supported"
    return None


class DenseAddLayerNorm(nn.Module, NoTorchScript):
    """BERT's output sublayer ``LayerNorm(dropout(dense(x)) + residual)`` (``BertSelfOutput``,
    ``BertOutput`` and copies) as one :func:`fastbert.add_layer_norm` with
    ``input_bias = dense.bias``. forward(hidden_states (..., I), input_tensor (..., E)) -> (..., E)."""

    backend: Optional[str]

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return _linear_add_norm(hidden_states, self.dense, input_tensor, self.LayerNorm, self.dropout,
                                self.backend)


def _is_deberta_norm(m) -> bool:
    """DeBERTa's (v1) ``DebertaLayerNorm``: a LayerNorm over the last dim (eps inside the square
    root, ``variance_epsilon``) computed in fp32, rounded to the input's dtype, then scaled and
    shifted in the parameters' (so the result takes the promoted dtype of input and weight)."""
    if isinstance(m, DebertaLayerNorm):  # fastbert's stand-in
        return True
    return (type(m).__name__ == "DebertaLayerNorm" and _family(m) == "deberta"
            and isinstance(getattr(m, "weight", None), Tensor) and isinstance(getattr(m, "bias", None), Tensor)
            and isinstance(getattr(m, "variance_epsilon", None), float))


def _is_layer_norm(m) -> bool:
    return isinstance(m, nn.LayerNorm) or _is_deberta_norm(m)


def _norm_out(out: Tensor, norm: nn.Module) -> Tensor:
    """A LayerNorm result in the dtype ``norm`` returns: DebertaLayerNorm's is the promoted dtype of
    its input and weight (a 16-bit input with fp32 parameters gives fp32)."""
    if _is_deberta_norm(norm):
        return out.to(torch.promote_types(out.dtype, norm.weight.dtype))
    return out


def _linear_add_norm(x: Tensor, lin: nn.Module, residual: Tensor, norm: nn.Module,
                     dropout: Optional[nn.Module], backend: Optional[str]) -> Tensor:
    """``norm(dropout(lin(x)) + residual)`` as one ``add_layer_norm``, with the Linear's bias fused
    as its ``input_bias``, where each module runs plainly (:mod:`fastbert.nn._fuse`: anything else,
    e.g. a LoRA adapter or a hooked LayerNorm put on the model after optimize(), is called).
    ``norm``: an ``nn.LayerNorm`` or a DebertaLayerNorm; ``dropout``: the Dropout module the
    original calls there (acting in its own mode), or None."""
    h, bias = matmul(x, lin)
    if not _is_deberta_norm(norm):
        return add_norm(h, bias, dropout, residual, norm, backend)
    p = 0.0 if dropout is None else dropout_rate(dropout)
    if p is None or not runs_plainly(norm, type(norm)):
        return norm(residual + unfused_dropout(h, bias, dropout))
    out = ops.add_layer_norm(h, residual, norm.weight, norm.bias, norm.variance_epsilon, input_bias=bias,
                             dropout_p=p, backend=backend)
    return _norm_out(out, norm)


class DebertaLayerNorm(nn.Module, NoTorchScript):
    """DeBERTa's ``DebertaLayerNorm`` (same parameters and ``variance_epsilon``) on
    :func:`fastbert.layer_norm`, in one pass and one rounding; its result has the original's dtype
    (input and weight promoted). forward(hidden_states (..., N)) -> (..., N)."""

    backend: Optional[str]

    def forward(self, hidden_states: Tensor) -> Tensor:
        out = ops.layer_norm(hidden_states, (self.weight.shape[-1],), self.weight, self.bias,
                             self.variance_epsilon, backend=self.backend)
        return _norm_out(out, self)


def _bias_act(x: Tensor, lin: nn.Module, act, backend: Optional[str]) -> Tensor:
    """act(x @ W^T + b), with the bias and a GELU fused in one ``bias_gelu``."""
    approximate = gelu_approximation(act)
    if approximate is None:
        return act(lin(x))
    h, bias = matmul(x, lin)
    if bias is None:
        return ops.gelu(h, approximate, backend=backend)
    return ops.bias_gelu(h, bias, approximate, backend=backend)


class DenseBiasGELU(nn.Module, NoTorchScript):
    """``intermediate_act_fn(dense(x))`` (``BertIntermediate``, ``ViTIntermediate`` and copies) with
    the bias and GELU fused in one :func:`fastbert.bias_gelu`. forward(hidden_states) -> (..., I)."""

    backend: Optional[str]

    def forward(self, hidden_states: Tensor) -> Tensor:
        return _bias_act(hidden_states, self.dense, self.intermediate_act_fn, self.backend)


class MLP(nn.Module, NoTorchScript):
    """transformers 5.x ``ViTMLP``: ``fc2(activation_fn(fc1(x)))`` with fc1's bias + GELU fused."""

    backend: Optional[str]

    def forward(self, hidden_states: Tensor) -> Tensor:
        h = _bias_act(hidden_states, self.fc1, self.activation_fn, self.backend)
        return self.fc2(h)


class DistilBertBlock(_LayerBase, NoTorchScript):
    """DistilBERT's ``TransformerBlock`` with both residual + LayerNorm sublayers fused:
    ``sa_layer_norm(out_lin(attn) + x)`` and ``output_layer_norm(dropout(lin2(gelu(lin1(.)))) + .)``
    each as one :func:`fastbert.add_layer_norm` (with the Linear's bias as ``input_bias``), lin1's
    bias + GELU as one :func:`fastbert.bias_gelu`. Same arguments and returns as the original
    (4.57: ``(x, attn_mask, head_mask, output_attentions)`` -> tuple; 5.x:
    ``(hidden_states, attention_mask, **kwargs)`` -> tensor)."""

    _fastbert_records_outputs = True  # runs its capturing hooks itself (attach_capturing_hooks)
    _fastbert_args: Tuple[str, ...]
    _fastbert_legacy: bool
    backend: Optional[str]

    def forward(self, *args, **kwargs):
        a = _bind(self._fastbert_args, args, kwargs)
        x = a.get("x", a.get("hidden_states"))
        mask = a.get("attn_mask", a.get("attention_mask"))
        want_weights = bool(a.get("output_attentions", False)) or collecting("attentions")
        attn: SelfAttention = self.attention
        ctx, weights = attn.context(x, mask, _head_mask(a), want_weights)
        if weights is not None:  # 5.x: the attention module's hooks collect its (output, weights)
            _record_outputs(attn, (x,), (ctx, weights))
        ffn = self.ffn
        sa = _linear_add_norm(ctx, attn.out_lin, x, self.sa_layer_norm, None, self.backend)
        h = _bias_act(sa, ffn.lin1, ffn.activation, self.backend)
        out = _linear_add_norm(h, ffn.lin2, sa, self.output_layer_norm, ffn.dropout, self.backend)
        if self._fastbert_legacy:
            return (weights, out) if want_weights else (out,)
        _record_outputs(self, args, out)
        return out


class AlbertLayer(nn.Module, NoTorchScript):
    """ALBERT's ``AlbertLayer`` with the feed-forward fused: ``full_layer_layer_norm(ffn_output(
    act(ffn(a))) + a)`` as ``bias_gelu`` + one ``add_layer_norm`` (ALBERT applies no dropout there).
    Same arguments and returns as the original in 4.57 and 5.x."""

    _fastbert_records_outputs = True  # runs its capturing hooks itself (attach_capturing_hooks)
    _fastbert_args: Tuple[str, ...]
    _fastbert_legacy: bool
    backend: Optional[str]

    def forward(self, *args, **kwargs):
        a = _bind(self._fastbert_args, args, kwargs)
        if self._fastbert_legacy:
            attention_output = self.attention(a["hidden_states"], a.get("attention_mask"),
                                              _head_mask(a), a.get("output_attentions", False))
            att = attention_output[0]
        else:
            rest = {k: v for k, v in a.items() if k not in ("hidden_states", "attention_mask")}
            att, _ = self.attention(a["hidden_states"], a.get("attention_mask"), **rest)
        h = _bias_act(att, self.ffn, self.activation, self.backend)
        out = _linear_add_norm(h, self.ffn_output, att, self.full_layer_layer_norm, None, self.backend)
        if self._fastbert_legacy:
            return (out,) + tuple(attention_output[1:])
        _record_outputs(self, args, out)
        return out


# ----------------------------------------------------------------------------------------------
# The swapper used by fastbert.optimize
# ----------------------------------------------------------------------------------------------
def _family(module: nn.Module) -> Optional[str]:
    parts = type(module).__module__.split(".")
    if len(parts) >= 3 and parts[0] == "transformers" and parts[1] == "models":
        return parts[2]
    return None


def _has(module: nn.Module, **kinds) -> bool:
    return all(isinstance(getattr(module, n, None), k) for n, k in kinds.items())


_OUTPUT_SUBLAYERS = {(family, prefix + kind) for family, prefix in {**_BERT_LAYOUT, **_BERT_SUBLAYERS}.items()
                     for kind in ("SelfOutput", "Output")}
_INTERMEDIATES = ({(family, prefix + "Intermediate")
                   for family, prefix in {**_BERT_LAYOUT, **_BERT_SUBLAYERS}.items()}
                  | {("vit", "ViTIntermediate"), ("xlm_roberta_xl", "XLMRobertaXLIntermediate")})


def _swap_attention(module, spec, backend):
    reason = _attention_refusal(module, spec)
    if reason:
        return None, reason
    args = _arg_names(type(module))
    new = adopt(SelfAttention, module, backend=backend, _fastbert_spec=spec, _fastbert_args=args,
                _fastbert_legacy=spec.legacy_tuple and "output_attentions" in args)
    attach_capturing_hooks(module, new)
    return new, None


# ----------------------------------------------------------------------------------------------
# Padding-free base models (fastbert.optimize(model, padding_free=True))
# ----------------------------------------------------------------------------------------------
# What the padding-free encoders take; any other argument (output_attentions, head_mask, ...) that
# is set makes the model run its original forward for that call.
_PADDING_FREE_ARGS = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids",
                                "inputs_embeds", "return_dict", "use_cache", "cache_position",
                                # the loss's token count: transformers 5.x's Trainer passes it to
                                # every model whose forward takes **kwargs; heads hand it on to
                                # the base model, whose layers ignore it
                                "num_items_in_batch"})


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _tree_edges(root: nn.Module) -> Tuple[list, list]:
    """``root``'s module tree: every edge, as (the parent's child dict, name, child), and every
    parent's child dict with its size (a child added under a new name changes only that)."""
    parents = [(parent._modules, len(parent._modules)) for parent in root.modules()]
    return [(children, name, child) for children, _ in parents for name, child in children.items()], parents


def _same_tree(tree: Tuple[list, list]) -> bool:
    edges, parents = tree
    return (all(len(children) == n for children, n in parents)
            and all(children.get(name) is child for children, name, child in edges))


def _hook_counts(modules: list) -> list:
    """Per module: how many hooks (output-capturing ones not counted: transformers installs those
    while a call collects outputs) and whether its instance has a forward."""
    return [(len(m._forward_pre_hooks), len(m._backward_pre_hooks), len(m._backward_hooks),
             sum(not _is_capturing(h) for h in m._forward_hooks.values()) if m._forward_hooks else 0,
             "forward" in m.__dict__) for _, m in modules]


def _bypassed(root: nn.Module, encoder: nn.Module) -> list:
    """(path, module) of the modules whose forward the padding-free path does not call: all but
    ``root``, its ``pooler`` subtree and the subtrees the encoder calls on the padded batch as the
    original does (``padded_submodules``: BertEncoder's embeddings; ModernBertEncoder runs its
    embeddings on the packed tokens)."""
    names = ("pooler",) + tuple(getattr(encoder, "padded_submodules", ()))
    called = {id(m) for name in names if isinstance(root._modules.get(name), nn.Module)
              for m in root._modules[name].modules()}
    return [(path, m) for path, m in root.named_modules() if path and id(m) not in called]


def _hook_reason(modules: list) -> Optional[str]:
    """Why a hook (or a forward replaced on an instance) among ``modules`` needs the original
    forward, or None; transformers' and fastbert's output-capturing hooks do not count."""
    for path, m in modules:
        capturing = {id(h) for h in _capturing_hooks(m)}
        if any(id(h) not in capturing for d in _HOOK_DICTS for h in getattr(m, d).values()):
            return f"a hook on {path}, which the padding-free encoder would not run"
        if "forward" in m.__dict__ and not _own_forward(m):
            return f"a forward replaced on {path}'s instance"
    return None


@dataclass
class _Watch:
    """The model's module tree when :class:`PaddingFreeModel`'s encoder was built on it, and what
    that allows (see :meth:`PaddingFreeModel._model_changed_reason`)."""
    tree: Tuple[list, list]
    bypassed: list
    hook_counts: list
    refused: Optional[str] = None
    hooked: Optional[str] = None


class PaddingFreeModel(nn.Module, NoTorchScript):
    """A HuggingFace encoder base model whose forward runs fastbert's padding-free encoder
    (:class:`fastbert.models.BertEncoder` for BERT and its copies, pre-LN ones included,
    DistilBERT, ALBERT and MPNet;
    :class:`fastbert.models.ModernBertEncoder` for ModernBERT): the padding is removed once, every
    layer computes only the real tokens, and the result is scattered back. Built by
    :func:`swap_padding_free` (through ``fastbert.optimize(model, padding_free=True)``) on the
    model's own modules and Parameters; same ``state_dict``.

    forward: the original's arguments and outputs (``last_hidden_state``, and BERT's or ALBERT's
    ``pooler_output``), equal on the real tokens; padded positions of ``last_hidden_state`` are 0.
    A call asking for what the encoders do not compute (``output_attentions``,
    ``output_hidden_states``, a ``head_mask``, an attention mask other than a (B, L) padding mask,
    cross-attention inputs, a cache), and training with gradient checkpointing enabled, run the
    original module instead (it shares every submodule); so does a call after a hook (or an
    instance forward) was put on one of the model's modules. Modules put on the model after
    optimize() (a LoRA adapter in a Linear's place) are picked up: the encoder is rebuilt on them
    and calls what it cannot fuse (host checks cost about 50 us a call for a 12-layer model, a
    rebuild 2 ms once after a change); under torch.compile nothing is rebuilt: after such a change
    a compiled model runs the original forward until one call is made outside torch.compile.
    Attributes and methods of the original
    model class that this module lacks (``get_input_embeddings``, ``config``, ...) are the
    original's. Under a plain torch.compile the mask's values are read as in eager mode (a graph
    break). In one graph (Dynamo's ``capture_dynamic_output_shape_ops`` and
    ``capture_scalar_outputs``) they cannot be: a float mask runs the original forward, and a
    left-padded row, or a gap where the encoder refuses one, fails the call with a runtime
    assertion (``Runtime assertion failed for expression u0 >= 1``) instead of giving another
    model's answer.
    """

    _fastbert_args: Tuple[str, ...]
    _fastbert_token_types: bool  # whether the encoder takes token_type_ids (BertEncoder does)
    _fastbert_mask_checked: bool  # whether its forward takes mask_checked= (BertEncoder's does)
    _fastbert_output_cls: type  # the ModelOutput class the original returns (_output_class)
    _fastbert_in_place = False  # True: the original's instance forward runs this one (its root)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules
        except AttributeError:
            original = self.__dict__.get("_fastbert_hf_module")
            if original is None:
                raise
            return getattr(original, name)

    def _model_changed_reason(self) -> Optional[str]:
        """The encoder shares the model's modules as they were when it was built. When the module
        tree changed since (a LoRA adapter put in a Linear's place after optimize(), any child
        replaced): rebuilt on it, calling what it cannot fuse. Returns why the original forward
        must run instead (None when it need not): a module the encoder refuses, or a hook (or an
        instance forward) on a module whose forward it does not call. Under torch.compile nothing
        is rebuilt: a tree changed since the last eager call runs the original forward."""
        state = self.__dict__.get("_fastbert_watch")
        if getattr(state, "tree", None) is None or not _same_tree(state.tree):  # (None: a pickle)
            if torch.compiler.is_compiling():
                return "modules changed since the last call outside torch.compile"
            state = self._rebuild()
        if _hook_counts(state.bypassed) != state.hook_counts:
            if torch.compiler.is_compiling():
                return "hooks changed since the last call outside torch.compile"
            state.hook_counts = _hook_counts(state.bypassed)
            state.hooked = _hook_reason(state.bypassed)
        return state.refused or state.hooked

    def _rebuild(self) -> "_Watch":
        encoder = self.__dict__["_fastbert_encoder"]
        refused = None
        try:
            new = type(encoder).from_hf(self, backend=encoder.backend)
            _set_own_mode(new, self.training)
            self.__dict__["_fastbert_encoder"] = new
        except Exception as e:  # a module the encoder cannot read (a replaced attention, ...)
            refused = f"a module put on the model after optimize() ({type(e).__name__}: {e})"
        return self._watch(refused)

    def _watch(self, refused: Optional[str] = None) -> "_Watch":
        original = self.__dict__["_fastbert_hf_module"]
        if self._modules is not original._modules:  # (a pickle made before they were shared)
            original._modules.update(self._modules)
            self.__dict__["_modules"] = original._modules
        bypassed = _bypassed(self, self.__dict__["_fastbert_encoder"])
        if refused is None:
            # the encoder calls (or fuses) the modules it holds, and never calls the others: the
            # containers among those (the layers, their attention and output blocks) must be
            # transformers' (or fastbert's) own, whose forward it computes
            held = {id(m) for m in self.__dict__["_fastbert_encoder"].modules()}
            for path, m in bypassed:
                if id(m) not in held and m._modules and type(m) not in (nn.ModuleList, nn.ModuleDict) \
                        and not type(m).__module__.startswith(("transformers.", "fastbert.")):
                    refused = (f"{path} is a {type_name(m)}, whose forward the padding-free encoder "
                               "would not call")
                    break
        state = _Watch(_tree_edges(self), bypassed, _hook_counts(bypassed), refused, _hook_reason(bypassed))
        self.__dict__["_fastbert_watch"] = state
        return state

    def _fallback_reason(self, a: Dict[str, object]) -> Optional[str]:
        reason = self._model_changed_reason()
        if reason is not None:
            return reason
        accepted = self.__dict__.get("_fastbert_kw_names")  # None: the original takes **kwargs
        for k, v in a.items():
            if accepted is not None and k not in accepted:
                return k  # the original's forward raises its TypeError
            if k not in _PADDING_FREE_ARGS and v is not None and v is not False:
                return k
        mask = a.get("attention_mask")
        if isinstance(mask, Tensor):
            if mask.dim() != 2:
                return "a mask other than (B, L) padding"  # e.g. a 4-D extended or custom mask
            host = mask_reads_allowed(mask.device)
            if mask.is_floating_point() and not host:
                return ("a float mask in a one-graph torch.compile (whether it holds only 0 and 1 "
                        "cannot be read)")
            if mask.is_floating_point() and not bool(((mask == 0) | (mask == 1)).all()):
                return "a float mask with values other than 0 and 1 (the original adds them as a bias)"
            # the heads read position 0 (BERT's pooler, DistilBERT's classifier): with left
            # padding it is a padded position, which the padding-free encoder leaves at 0. Read
            # on the host (under a plain torch.compile: a graph break); in a one-graph compile,
            # a runtime assertion fails the call instead
            if mask.numel():
                if host and not bool(mask[:, 0].all()):
                    return "a row whose first position is padding (left padding; the heads read position 0)"
                if not host:
                    mask_assert(mask[:, 0].all())
            unsupported = getattr(self.__dict__["_fastbert_encoder"], "unsupported_mask", None)
            reason = unsupported(mask) if unsupported is not None else None
            if reason is not None:
                return reason
        config = getattr(self, "config", None)
        for k in ("output_attentions", "output_hidden_states"):
            if getattr(config, k, False):
                return f"config.{k}"
        if self.training and any(getattr(m, "gradient_checkpointing", False) is True for m in self.modules()):
            return "gradient checkpointing"  # the encoders keep every activation
        return None

    def forward(self, *args, **kwargs):
        a = _bind(self._fastbert_args, args, kwargs)
        if self._fallback_reason(a) is not None:
            original = self.__dict__["_fastbert_hf_module"]
            original.training = self.training  # its submodules are this module's
            if self._fastbert_in_place:  # it is calling us from its forward: its class's
                return type(original).forward(original, *args, **kwargs)
            return original(*args, **kwargs)
        enc = self.__dict__["_fastbert_encoder"]
        if enc.training != self.training:
            _set_own_mode(enc, self.training)
        call = {k: a.get(k) for k in ("input_ids", "attention_mask", "position_ids", "inputs_embeds")}
        if isinstance(call["attention_mask"], Tensor) and call["attention_mask"].is_floating_point():
            call["attention_mask"] = call["attention_mask"] != 0  # 1.0 / 0.0, as _fallback_reason checked
        if self._fastbert_token_types:
            call["token_type_ids"] = a.get("token_type_ids")
        if self._fastbert_mask_checked:
            call["mask_checked"] = True  # _fallback_reason asked enc.unsupported_mask already
        hidden = enc(**call)
        fields = {"last_hidden_state": hidden}
        pooler = getattr(self, "pooler", None)
        if "pooler_activation" in self._modules:  # ALBERT: a Linear and a tanh on the first token
            fields["pooler_output"] = self.pooler_activation(pooler(hidden[:, 0]))
        elif pooler is not None:  # BERT and its copies, MPNet (None: add_pooling_layer=False)
            fields["pooler_output"] = pooler(hidden)
        out_cls = self._fastbert_output_cls
        out = out_cls(**{k: v for k, v in fields.items() if k in out_cls.__dataclass_fields__})
        return_dict = a.get("return_dict")
        if return_dict is None:
            config = getattr(self, "config", None)
            return_dict = getattr(config, "return_dict", True)  # (use_return_dict: deprecated in 5.x)
        return out if return_dict else out.to_tuple()


def _annotated_output(cls) -> Optional[type]:
    """The ModelOutput class ``cls.forward`` is annotated to return, or None."""
    from transformers.utils import ModelOutput
    try:
        hint = typing.get_type_hints(cls.forward).get("return")
    except Exception:  # an annotation that does not resolve
        return None
    for c in (hint, *typing.get_args(hint)):
        if isinstance(c, type) and issubclass(c, ModelOutput):
            return c
    return None


def _output_class(module: nn.Module) -> type:
    """The ModelOutput class HuggingFace base model ``module`` returns, from its forward's return
    annotation; where that names fewer fields than its encoder's annotation and no pooler (ELECTRA
    returns its encoder's output as it is), the encoder's."""
    from transformers import modeling_outputs
    out = _annotated_output(type(module))
    encoder = getattr(module, "encoder", None)
    inner = _annotated_output(type(encoder)) if isinstance(encoder, nn.Module) else None
    if inner is not None and (out is None or ("pooler_output" not in out.__dataclass_fields__
                                              and set(out.__dataclass_fields__) < set(inner.__dataclass_fields__))):
        out = inner
    return out or modeling_outputs.BaseModelOutput


def padding_free_refusal(parent: nn.Module) -> Optional[str]:
    """Why a base model held by ``parent`` must not be made padding-free (None when it may): a
    question-answering head takes its loss's softmax over every position, padded ones included,
    whose logits the padding-free encoder would change (it leaves padded positions at 0); so does a
    sequence summary (ELECTRA's multiple-choice head) other than the first token's: the mean of
    every position, the last one, or positions given by the caller."""
    if "QuestionAnswering" in type(parent).__name__:
        return (f"not made padding-free: {type(parent).__name__}'s loss reads every position, padded "
                "ones included (their hidden states would be 0 instead of the original's)")
    for name, m in parent.named_modules():
        kind = getattr(m, "summary_type", None)
        if isinstance(kind, str) and kind != "first":
            return (f"not made padding-free: its {name} ({type(m).__name__}, summary_type={kind!r}) "
                    "reads positions that may be padded (their hidden states would be 0 instead of "
                    "the original's)")
    return None


# In the __dict__ of a base model made padding-free in place (the root optimize() was given): the
# PaddingFreeModel its instance forward runs.
_IN_PLACE = "_fastbert_padding_free"


def make_padding_free_in_place(module: nn.Module, padding_free: "PaddingFreeModel") -> None:
    """Give ``module`` (the HuggingFace base model ``padding_free`` was built from, and the root of
    ``fastbert.optimize(module, padding_free=True)``, which nothing can replace) an instance
    ``forward`` that runs ``padding_free``: ``module`` stays what it is (its class, ``state_dict``,
    ``save_pretrained``, the signature tools such as the Trainer read), and a call the encoders
    cannot serve runs its class's forward. Undone by :func:`undo_padding_free_in_place`. A pickled
    copy (``torch.save(model)``) loads with its class's forward."""
    import functools
    import types

    @functools.wraps(type(module).forward)  # name, docstring and signature: the original's
    def forward(self, *args, **kwargs):
        pf = self.__dict__[_IN_PLACE]
        pf.training = self.training
        return pf.forward(*args, **kwargs)

    forward._fastbert_in_place = True
    padding_free.__dict__["_fastbert_in_place"] = True
    module.__dict__[_IN_PLACE] = padding_free
    module.forward = types.MethodType(forward, module)


def is_padding_free_in_place(module: nn.Module) -> bool:
    """Whether ``module`` runs the forward :func:`make_padding_free_in_place` gave it (a pickled
    copy does not: it loads with its class's)."""
    forward = getattr(module.__dict__.get("forward"), "__func__", None)
    return getattr(forward, "_fastbert_in_place", False) and _IN_PLACE in module.__dict__


def undo_padding_free_in_place(module: nn.Module) -> bool:
    """Remove what :func:`make_padding_free_in_place` added; whether there was any."""
    if _IN_PLACE not in module.__dict__:
        return False
    del module.__dict__[_IN_PLACE]
    module.__dict__.pop("forward", None)
    return True


def swap_padding_free(module: nn.Module, backend: Optional[str] = None):
    """A :class:`PaddingFreeModel` for a HuggingFace ``BertModel`` (or a copy: RoBERTa, ELECTRA,
    XLM-RoBERTa, CamemBERT, Data2Vec-Text, ERNIE; the pre-LayerNorm XLM-RoBERTa-XL and
    RoBERTa-PreLayerNorm), ``DistilBertModel``, ``AlbertModel``, ``MPNetModel`` (its
    relative-position bias read by the varlen kernels at each sequence's positions) or
    transformers 5.x ``ModernBertModel``:
    ``(new, None)``; ``(None, reason)`` where the encoder refuses the model (decoders, relative
    position embeddings, ...: its layers are then swapped as usual); ``(None, None)`` for any other
    module. Used by ``fastbert.optimize(model, padding_free=True)``."""
    from ..models import BertEncoder, ModernBertEncoder

    family, name = _family(module), type(module).__name__
    bert_like = {**_BERT_LAYOUT, **_BERT_ATTENTION_ONLY}  # post-LN and the pre-LN copies
    if (family in bert_like and name == bert_like[family] + "Model") or (
            (family, name) in (("distilbert", "DistilBertModel"), ("albert", "AlbertModel"),
                               ("mpnet", "MPNetModel"))):
        encoder_cls = BertEncoder
    elif (family, name) == ("modernbert", "ModernBertModel"):
        encoder_cls = ModernBertEncoder
    elif isinstance(module, transformers.PreTrainedModel) and getattr(module, "base_model", None) is module:
        # a base model of another family (DeBERTa, ViT, a decoder, ...): said in the report, and
        # its layers are looked at one by one as without padding_free
        return None, (f"not made padding-free: fastbert has no padding-free encoder for {name} "
                      "(its layers are swapped one by one)")
    else:
        return None, None
    try:
        encoder = encoder_cls.from_hf(module, backend=backend)
    except ValueError as e:
        return None, f"not made padding-free: {e}"
    params = inspect.signature(encoder.forward).parameters
    embeddings = getattr(module, "embeddings", None)
    # DistilBERT's and MPNet's embeddings take no token_type_ids: their models ignore the ones a
    # tokenizer returns (through **kwargs), and so does the padding-free forward
    token_types = "token_type_ids" in params and (
        embeddings is None or "token_type_ids" in inspect.signature(embeddings.forward).parameters)
    params_hf = inspect.signature(type(module).forward).parameters.values()
    kw_names = (None if any(p.kind == p.VAR_KEYWORD for p in params_hf)
                else frozenset(p.name for p in params_hf if p.kind != p.VAR_POSITIONAL))
    new = adopt(PaddingFreeModel, module, _fastbert_args=_arg_names(type(module)),
                _fastbert_kw_names=kw_names,
                _fastbert_token_types=token_types, _fastbert_mask_checked="mask_checked" in params,
                _fastbert_output_cls=_output_class(module))
    # neither is a submodule (state_dict is unchanged); both share this module's submodules
    new.__dict__["_modules"] = module._modules  # one set of children: a child put on either is both's
    new.__dict__["_fastbert_encoder"] = encoder
    new.__dict__["_fastbert_hf_module"] = module
    refused = new._watch().refused
    if refused is not None:
        return None, f"not made padding-free: {refused}"
    return new, None


def swap_module(module: nn.Module, backend: Optional[str] = None):
    """The fastbert replacement for one HuggingFace module: ``(new_module, None)``, ``(None,
    reason)`` for a module fastbert recognises but leaves, ``(None, None)`` for anything else (the
    caller then looks at its children). Used by :func:`fastbert.optimize`.

    Every replacement gets the output-capturing hooks transformers 5.x would give the module it
    replaces (:func:`attach_capturing_hooks`), so that ``output_attentions`` /
    ``output_hidden_states`` keep working."""
    new, reason = _swap(module, backend)
    if new is not None:
        attach_capturing_hooks(module, new)
    return new, reason


def _swap(module: nn.Module, backend: Optional[str]):
    family = _family(module)
    if family is None:
        # transformers' own GELU activation modules (transformers.activations), in any model.
        cls = type(module)
        if cls.__module__ == "transformers.activations":
            approximate = gelu_approximation(module)
            if approximate is not None:
                return GELU(approximate, backend=backend), None
        return None, None
    name = type(module).__name__
    if family not in FAMILIES:
        if name.endswith("Attention"):
            reason = (f"model family {family!r} is not supported by fastbert.optimize "
                      f"(supported: {', '.join(FAMILIES)})")
            if hasattr(sys.modules.get(type(module).__module__), "ALL_ATTENTION_FUNCTIONS"):
                # the family dispatches its attention through transformers' AttentionInterface
                reason += ("; its attention can run on fastbert's kernels if the model is loaded "
                           "with attn_implementation='fastbert' (see fastbert.integrations.huggingface)")
            return None, reason
        return None, None
    key = (family, name)
    spec = _ATTENTION_SPECS.get(key)
    if spec is not None and hasattr(module, spec.q):
        return _swap_attention(module, spec, backend)
    if "CrossAttention" in name:
        return None, "cross-attention is not supported"
    if key == ("modernbert", "ModernBertEncoderLayer"):
        reason = _modernbert_refusal(module)
        if reason:
            return None, reason
        attn = adopt(ModernBertAttention, module.attn, backend=backend,
                     _fastbert_rotary=sys.modules[type(module).__module__].apply_rotary_pos_emb)
        attach_capturing_hooks(module.attn, attn)
        new = adopt(ModernBertLayer, module, backend=backend)
        new.attn = attn
        return new, None
    if key == ("deberta_v2", "DisentangledSelfAttention"):
        reason = _deberta_refusal(module)
        if reason:
            return None, reason
        return adopt(DebertaV2SelfAttention, module, backend=backend, _fastbert_hf_cls=type(module),
                     _fastbert_args=_arg_names(type(module))), None
    if key == ("deberta", "DisentangledSelfAttention"):
        reason = _deberta_v1_refusal(module)
        if reason:
            return None, reason
        return adopt(DebertaSelfAttention, module, backend=backend, _fastbert_hf_cls=type(module),
                     _fastbert_args=_arg_names(type(module))), None
    if key == ("deberta", "DebertaLayerNorm") and _is_deberta_norm(module):
        return adopt(DebertaLayerNorm, module, backend=backend), None
    if key in _OUTPUT_SUBLAYERS and _has(module, dense=nn.Linear, dropout=nn.Dropout) and _is_layer_norm(
            getattr(module, "LayerNorm", None)):
        return adopt(DenseAddLayerNorm, module, backend=backend), None
    if key in _INTERMEDIATES and _has(module, dense=nn.Linear):
        extra = [n for n, _ in module.named_parameters() if not n.startswith("dense.")]
        if extra:
            return None, f"has parameters fastbert would not use: {extra}"
        if gelu_approximation(module.intermediate_act_fn) is None:
            return None, f"activation {type(module.intermediate_act_fn).__name__} is not GELU (left unfused)"
        return adopt(DenseBiasGELU, module, backend=backend), None
    if key == ("mpnet", "MPNetAttention"):
        if not _has(module, attn=nn.Module, LayerNorm=nn.LayerNorm, dropout=nn.Dropout):
            return None, "unexpected MPNetAttention structure: unknown transformers version"
        reason = _attention_refusal(module.attn, _MPNET_ATTN)
        if reason:
            return None, reason
        return adopt(MPNetAttention, module, backend=backend,
                     _fastbert_args=_arg_names(type(module))), None
    if key == ("vit", "ViTMLP") and _has(module, fc1=nn.Linear, fc2=nn.Linear):
        return adopt(MLP, module, backend=backend), None
    if key == ("distilbert", "TransformerBlock"):
        attention = module.attention
        aspec = _ATTENTION_SPECS.get(("distilbert", type(attention).__name__))
        if aspec is None:
            return None, f"unknown attention class {type(attention).__name__}"
        new_attention, reason = _swap_attention(attention, aspec, backend)
        if reason:
            return None, reason
        if not _has(module, sa_layer_norm=nn.LayerNorm, output_layer_norm=nn.LayerNorm) or not _has(
                module.ffn, lin1=nn.Linear, lin2=nn.Linear, dropout=nn.Dropout):
            return None, "unexpected TransformerBlock structure: unknown transformers version"
        args = _arg_names(type(module))
        new = adopt(DistilBertBlock, module, backend=backend, _fastbert_args=args,
                    _fastbert_legacy="output_attentions" in args)
        new.attention = new_attention
        return new, None
    if key == ("albert", "AlbertLayer") and _has(module, ffn=nn.Linear, ffn_output=nn.Linear,
                                                 full_layer_layer_norm=nn.LayerNorm):
        aspec = _ATTENTION_SPECS.get(("albert", type(module.attention).__name__))
        args = _arg_names(type(module))
        new = adopt(AlbertLayer, module, backend=backend, _fastbert_args=args,
                    _fastbert_legacy="output_attentions" in args)
        if aspec is not None:
            new_attention, reason = _swap_attention(module.attention, aspec, backend)
            if new_attention is not None:
                new.attention = new_attention
        return new, None
    return None, None


register()
