"""Swap fastbert into an existing model: :func:`optimize` and :func:`restore`.

``optimize(model)`` walks the module tree and replaces, in place, every submodule fastbert has a
drop-in for, building each replacement on the very same Parameter (and buffer) objects — nothing
is copied, optimizer state and tied weights stay valid, ``state_dict`` keys do not change:

=====================================  ===========================================================
``torch.nn.MultiheadAttention``         :class:`fastbert.nn.MultiheadAttention`
``torch.nn.TransformerEncoderLayer``    :class:`fastbert.nn.TransformerEncoderLayer`
``torch.nn.LayerNorm`` / ``GELU``       :class:`fastbert.nn.LayerNorm` / :class:`fastbert.nn.GELU`
HuggingFace BERT, RoBERTa, DistilBERT,  self-attention, output sublayers (dense -> dropout ->
ALBERT, ELECTRA, ViT, MPNet,            add + LayerNorm fused), intermediate bias + GELU fused,
DeBERTa (v1, v2/v3), ModernBERT and     LayerNorms and GELU activations (see
copies                                  :mod:`fastbert.integrations.huggingface`)
=====================================  ===========================================================

Only these exact classes are swapped: a user subclass may have its own forward and is left, with
the reason in the report. ``restore(model)`` puts the original modules back. With
``padding_free=True`` a HuggingFace BERT-style (pre-LN XLM-R-XL / RoBERTa-PreLayerNorm included),
DistilBERT, ALBERT, MPNet or ModernBERT base model inside ``model``, and a ``torch.nn.TransformerEncoder``,
is replaced as a whole by one that computes only the real tokens (see :func:`optimize`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

from .nn import GELU, LayerNorm, MultiheadAttention, TransformerEncoder, TransformerEncoderLayer
from .nn._utils import _own_forward, check_backend
from .nn.transformer import self_attn_refusal

__all__ = ["optimize", "restore", "OptimizeReport", "Swapped", "Left"]

# Attribute (in a module's __dict__, so not a submodule and not in state_dict) holding the module a
# fastbert replacement was built from; restore() puts it back.
_ORIGINAL = "_fastbert_original"
# On each module a replacement built: its children at optimize() time (restore: which are new).
_CHILDREN = "_fastbert_children"
# On a torch.nn.TransformerEncoder whose layers were swapped: its use_nested_tensor before.
_NESTED = "_fastbert_use_nested_tensor"


@dataclass(frozen=True)
class Swapped:
    """A submodule that was replaced: its dotted path, original class and fastbert class."""
    path: str
    original: str
    replacement: str


@dataclass(frozen=True)
class Left:
    """A submodule fastbert recognised but did not replace, and why."""
    path: str
    module: str
    reason: str


@dataclass
class OptimizeReport:
    """What :func:`optimize` did. ``swapped`` and ``left`` are lists of :class:`Swapped` / :class:`Left`;
    ``str(report)`` is a readable table; ``report.counts()`` counts swaps per original class."""
    backend: Optional[str] = None
    swapped: List[Swapped] = field(default_factory=list)
    left: List[Left] = field(default_factory=list)

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for s in self.swapped:
            out[s.original] = out.get(s.original, 0) + 1
        return out

    def __str__(self) -> str:
        lines = [f"fastbert.optimize (backend={self.backend!r}): {len(self.swapped)} module(s) "
                 f"swapped, {len(self.left)} left"]
        for s in self.swapped:
            lines.append(f"  swapped  {s.path or '<root>'}: {s.original} -> {s.replacement}")
        for s in self.left:
            lines.append(f"  left     {s.path or '<root>'}: {s.module} ({s.reason})")
        return "\n".join(lines)


def _name(module: nn.Module) -> str:
    return _class_name(type(module))


def _class_name(cls) -> str:
    """A readable dotted name: torch.nn.LayerNorm, transformers.bert.BertSelfAttention,
    fastbert.nn.LayerNorm, fastbert.integrations.huggingface.SelfAttention."""
    parts = cls.__module__.split(".")
    if parts[:3] == ["torch", "nn", "modules"]:
        return f"torch.nn.{cls.__qualname__}"
    if parts[:2] == ["transformers", "models"] and len(parts) > 2:
        return f"transformers.{parts[2]}.{cls.__qualname__}"
    if parts[:2] == ["fastbert", "nn"]:
        return f"fastbert.nn.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_fastbert(module: nn.Module) -> bool:
    return type(module).__module__.startswith("fastbert.")


_HOOKS = (("_forward_pre_hooks", "a forward pre-hook"), ("_forward_hooks", "a forward hook"),
          ("_backward_pre_hooks", "a backward pre-hook"), ("_backward_hooks", "a backward hook"))


def _hook_refusal(module: nn.Module) -> Optional[str]:
    """Why ``module`` may not be replaced because of hooks (None when it may): a replacement runs
    neither the hooks of the module it replaces nor those of the submodules it computes itself (a
    fused sublayer reads its LayerNorm's weight and never calls the LayerNorm), so a hook anywhere
    in ``module``'s tree, or a forward replaced on a submodule's instance (accelerate's device
    hooks), keeps it. transformers 5.x's output-capturing hooks are not the user's: fastbert's
    modules record those outputs themselves."""
    hf = sys.modules.get("fastbert.integrations.huggingface")
    for path, sub in module.named_modules():
        where = f" on its submodule {path}" if path else ""
        capturing = {id(h) for h in hf._capturing_hooks(sub)} if hf is not None else set()
        for attr, what in _HOOKS:
            if any(id(h) not in capturing for h in getattr(sub, attr).values()):
                return (f"it has {what}{where}, which its fastbert replacement would not run "
                        "(call optimize() before registering hooks, or remove them)")
        if path and "forward" in sub.__dict__ and not _own_forward(sub):
            return f"the forward of its submodule {path} is replaced on the instance (e.g. by accelerate's hooks)"
    return None


# A swapper returns (replacement, None), (None, reason) to report the module as left, or
# (None, None) when the module is not one it handles.
Swapper = Callable[[nn.Module, Optional[str]], Tuple[Optional[nn.Module], Optional[str]]]


def _swap_torch(module: nn.Module, backend: Optional[str]):
    cls = type(module)
    exact = {
        nn.MultiheadAttention: MultiheadAttention,
        nn.TransformerEncoderLayer: TransformerEncoderLayer,
        nn.LayerNorm: LayerNorm,
        nn.GELU: GELU,
    }
    if cls is nn.TransformerEncoderLayer and (refusal := self_attn_refusal(module)) is not None:
        return None, f"its self_attn {refusal}"
    if cls in exact:
        return exact[cls].from_torch(module, backend=backend), None
    for base in exact:
        if isinstance(module, base):
            return None, (f"subclass of torch.nn.{base.__name__} (its forward may differ); "
                          f"where it computes what torch's does, swap it by hand with "
                          f"fastbert.nn.{exact[base].__name__}.from_torch (which refuses a "
                          f"subclass that overrides forward)")
    return None, None


def _swap_torch_encoder(module: nn.Module, backend: Optional[str]):
    """padding_free: a torch.nn.TransformerEncoder of torch.nn.TransformerEncoderLayer as a whole
    -> fastbert.nn.TransformerEncoder (its layers swapped, an nn.LayerNorm norm too)."""
    if type(module) is not nn.TransformerEncoder:
        return None, None
    odd = [type(layer).__name__ for layer in module.layers if type(layer) is not nn.TransformerEncoderLayer]
    if odd:
        return None, (f"not made padding-free: its layers include {odd[0]}, not "
                      "torch.nn.TransformerEncoderLayer")
    for i, layer in enumerate(module.layers):
        if (refusal := self_attn_refusal(layer)) is not None:
            return None, f"not made padding-free: the self_attn of layers.{i} {refusal}"
    new = TransformerEncoder.from_torch(module, backend=backend)
    if type(module.norm) is nn.LayerNorm:
        new.norm = LayerNorm.from_torch(module.norm, backend=backend)
    return new, None


def _swappers(padding_free: bool = False) -> List[Swapper]:
    out: List[Swapper] = [_swap_torch_encoder, _swap_torch] if padding_free else [_swap_torch]
    # HuggingFace models: only when transformers is already imported (a model built from it
    # exists); fastbert never imports transformers on its own.
    if "transformers" in sys.modules:
        from .integrations import huggingface

        out.insert(0, huggingface.swap_module)
        if padding_free:
            out.insert(0, huggingface.swap_padding_free)
    return out


def optimize(model: nn.Module, *, backend: Optional[str] = None,
             padding_free: bool = False) -> OptimizeReport:
    """Replace, in place, every submodule of ``model`` that fastbert supports (see the module docs).

    Args:
        model: any ``torch.nn.Module``; modified in place (the root itself is never replaced: call
            ``fastbert.nn.X.from_torch(m)`` for a bare module; a HuggingFace base model given
            itself with ``padding_free=True`` gets the padding-free forward on the instance).
        backend: passed to every fastbert op the new modules call (None: ``FASTBERT_BACKEND`` or
            "auto" at call time).
        padding_free: also replace each HuggingFace encoder base model inside ``model`` (``BertModel``
            and its copies, the pre-LN ``XLMRobertaXLModel`` / ``RobertaPreLayerNormModel``,
            ``DistilBertModel``, ``AlbertModel``, ``MPNetModel``, transformers 5.x ``ModernBertModel``;
            e.g. ``model.bert`` of a
            ``BertForSequenceClassification``) by a
            :class:`~fastbert.integrations.huggingface.PaddingFreeModel`: its forward removes the
            padding once and computes only the real tokens (``fastbert.models.BertEncoder`` /
            ``ModernBertEncoder``). Outputs are equal on the real tokens; ``last_hidden_state`` is 0
            at padded positions (instead of values nothing should read). A call asking for
            attentions, hidden states or a head mask, or with a row whose first position is padding
            (left padding: classification heads read position 0), runs the original forward. A
            base model the encoders refuse, or under a question-answering head (its loss reads
            every position, padded ones included), is reported as left, and its layers are swapped
            as usual. A base model that is ``model`` itself (``AutoModel.from_pretrained(...)``)
            keeps its class: its instance ``forward`` becomes the padding-free one (same
            signature; a pickled copy loads with its class's forward). Each
            ``torch.nn.TransformerEncoder`` (of ``torch.nn.TransformerEncoderLayer``) becomes a
            :class:`fastbert.nn.TransformerEncoder`, which computes only the real tokens when
            called with ``src_key_padding_mask`` (0 at padded positions, as torch's nested-tensor
            path gives), in training too.

    Returns:
        an :class:`OptimizeReport` listing what was swapped and what was left, with reasons.

    The new modules hold the very same Parameter objects as the old ones (``state_dict`` keys are
    unchanged), run in train and eval mode, and give the original model's outputs up to floating
    point rounding. Differences to know: a query row whose keys are all masked gives 0 instead of
    NaN; dropout draws different random numbers than torch's (same distribution). A module with a
    hook (forward, forward pre-, backward) on it or on a submodule its replacement would compute
    itself is left, with the reason: hooks registered after optimize() on the new modules run. A
    module held under two names gets one replacement under both. Calling it twice is harmless
    (already swapped modules are skipped); :func:`restore` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    backend = check_backend(backend)
    if not isinstance(padding_free, bool):
        raise TypeError(f"padding_free must be a bool, got {type(padding_free).__name__}")
    report = OptimizeReport(backend=backend)
    swappers = _swappers(padding_free)
    memo: Dict[int, nn.Module] = {}  # a module shared by several parents gets one replacement
    walked = set()  # and a shared module that stays is looked at once

    def try_swap(module, parent=None):
        for swapper in swappers:
            try:
                new, reason = swapper(module, backend)
            except ValueError as e:  # adopt() refuses a module whose forward is wrapped
                return None, str(e)
            if new is not None:
                # refused: reported as left, and its submodules are looked at one by one
                refusal = _hook_refusal(module) or _parent_refusal(new, parent)
                return (new, None) if refusal is None else (None, refusal)
            if reason is not None:
                return None, reason
        return None, None

    hf = sys.modules.get("fastbert.integrations.huggingface")  # imported by _swappers if needed
    if hf is not None and hf.is_padding_free_in_place(model):
        return report  # optimized before
    if not _is_fastbert(model):
        new, reason = try_swap(model)
        if new is not None and hf is not None and isinstance(new, hf.PaddingFreeModel):
            # a base model given itself (AutoModel.from_pretrained(...)): padding-free in place;
            # its layers stay (its class's forward runs them when the encoders cannot serve a call)
            hf.make_padding_free_in_place(model, new)
            report.swapped.append(Swapped("", _name(model), _class_name(type(new)) + " (in place)"))
            return report
        if new is not None:
            reason = ("the root module cannot be replaced in place; use "
                      "fastbert.nn.<Module>.from_torch(module) or wrap it in a container")
        if reason is not None:
            report.left.append(Left("", _name(model), reason))

    def walk(parent: nn.Module, prefix: str) -> None:
        for name, child in _children(parent):
            path = prefix + name
            if _is_fastbert(child):
                continue
            if id(child) in memo:
                setattr(parent, name, memo[id(child)])
                continue
            if id(child) in walked:
                continue
            walked.add(id(child))
            new, reason = try_swap(child, parent)
            if new is not None:
                new.__dict__[_ORIGINAL] = child
                _snapshot_children(child, new)
                memo[id(child)] = new
                setattr(parent, name, new)
                report.swapped.append(Swapped(path, _name(child), _class_name(type(new))))
                continue
            if reason is not None:
                report.left.append(Left(path, _name(child), reason))
            walk(child, path + ".")
        if isinstance(parent, nn.TransformerEncoder):
            _fix_transformer_encoder(parent)

    walk(model, "")
    return report


def _parent_refusal(new: nn.Module, parent: Optional[nn.Module]) -> Optional[str]:
    """Why ``new`` may not replace a child of ``parent`` (a padding-free base model under a head
    that reads the padded positions), or None."""
    hf = sys.modules.get("fastbert.integrations.huggingface")
    if parent is None or hf is None or not isinstance(new, hf.PaddingFreeModel):
        return None
    return hf.padding_free_refusal(parent)


def _children(parent: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Every (name, child) of ``parent``, a child held under two names once per name (so that
    both names get the one replacement: ``named_children`` would yield it once)."""
    return [(name, child) for name, child in parent._modules.items() if child is not None]


def _fix_transformer_encoder(encoder: nn.TransformerEncoder) -> None:
    """torch.nn.TransformerEncoder decided at construction whether to pack inputs into nested
    tensors (its eval-mode fast path); fastbert layers take padded batches, so turn it off."""
    if getattr(encoder, "use_nested_tensor", False) and _NESTED not in encoder.__dict__:
        if any(_is_fastbert(layer) for layer in encoder.layers):
            encoder.__dict__[_NESTED] = encoder.use_nested_tensor
            encoder.use_nested_tensor = False


def _resync(original: nn.Module, new: nn.Module) -> None:
    """Make ``original`` hold the replacement's current Parameter/buffer objects (they differ only
    if something replaced a Parameter object of the new module after optimize())."""
    for kind, named in (("_parameters", new.named_parameters), ("_buffers", new.named_buffers)):
        for name, tensor in named(remove_duplicate=False):
            owner_path, _, attr = name.rpartition(".")
            try:
                owner = original.get_submodule(owner_path) if owner_path else original
            except AttributeError:
                continue
            store = getattr(owner, kind)
            if attr in store and store[attr] is not tensor:
                store[attr] = tensor


def _snapshot_children(original: nn.Module, new: nn.Module) -> None:
    """Record, on each module of the replacement ``new`` that ``original``'s tree does not share
    (those it built: itself, its containers, fastbert layers made inside it), the children it has
    at optimize() time, so that restore() can tell the ones put on it later."""
    shared = {id(m) for m in original.modules()}
    for m in new.modules():
        if id(m) not in shared:
            m.__dict__[_CHILDREN] = dict(m._modules)


def _resync_children(original: nn.Module, new: nn.Module) -> None:
    """Make ``original`` hold the children put on the replacement ``new`` after optimize() (a LoRA
    wrapper in a Linear's place, as peft puts one): the replacement holds its own copy of the
    original's children, so such a module reached only the replacement. A child is put back where
    it differs from the one recorded at optimize() time (:func:`_snapshot_children`) under a name
    ``original`` has; an unchanged child the replacement built is searched the same way."""
    recorded = new.__dict__.get(_CHILDREN)
    if recorded is None:  # shared with the original: a change in it is the original's already
        return
    for name, child in new._modules.items():
        if name not in original._modules:
            continue
        if child is not recorded.get(name):
            original._modules[name] = child
        elif child is not None and child is not original._modules[name]:
            _resync_children(original._modules[name], child)


def _copy_mode(original: nn.Module, new: nn.Module) -> None:
    """Give the modules of ``original`` that ``new`` does not share the train / eval mode of
    ``new``: a ``model.eval()`` or ``model.train()`` issued while optimized reached only the
    replacement (and the submodules it shares with the original, which keep their own mode)."""
    shared = {id(m) for m in new.modules()}
    for m in original.modules():
        if id(m) not in shared:
            m.training = new.training


def restore(model: nn.Module) -> int:
    """Undo :func:`optimize`: put every original module back (with the Parameter objects the
    fastbert modules hold). Returns the number of distinct modules restored (as many as
    optimize() reported swapped; 0 if none were)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    restored = set()
    hf = sys.modules.get("fastbert.integrations.huggingface")  # loaded if optimize() used it
    # a base model given itself to optimize(padding_free=True) runs its padding-free forward in
    # place: undone first, then its modules (an earlier plain optimize() may have swapped them)
    in_place = 1 if hf is not None and hf.undo_padding_free_in_place(model) else 0

    def walk(parent: nn.Module) -> None:
        if _NESTED in parent.__dict__:
            parent.use_nested_tensor = parent.__dict__.pop(_NESTED)
        for name, child in _children(parent):
            original = child.__dict__.get(_ORIGINAL)
            if original is not None:
                _resync(original, child)
                _resync_children(original, child)
                _copy_mode(original, child)
                if hf is not None:
                    hf.restore_capturing_hooks(model, original, child)
                setattr(parent, name, original)
                restored.add(id(child))
                walk(original)
            else:
                walk(child)

    walk(model)
    return in_place + len(restored)
