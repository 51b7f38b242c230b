"""Custom ops that stay one opaque op under torch.compile and cost little in eager mode.

Every Triton pass is a ``torch.library`` custom op (``fastbert::<name>``) with a fake implementation
and autograd, so that torch.compile(fullgraph=True), export, CUDA graph trees, selective activation
checkpointing and FlopCounterMode each see one op per pass. Calling a custom op from Python goes
through the dispatcher twice (autograd, then the device kernel) and a Dynamo-disabled wrapper: about
9-14 us a call on this project's 2-core CI host, against 1-3 us for an equivalent
``torch.autograd.Function``. A fused kernel at BERT-base shapes runs for 5-50 us, so in an eager
model that difference decides whether the host keeps the GPU busy (``bench/bench_overhead.py``
measures the host cost per call of every op).

:class:`FastOp` therefore keeps both: in plain eager mode it runs the implementation under an
``autograd.Function`` built from the same ``setup_context`` and ``backward`` that are registered
with the custom op (or calls it directly when no gradient can be needed), and it calls the custom op
whenever something may be tracing or intercepting ops: torch.compile or export, a tensor subclass
(FakeTensor, DTensor, ...), an active TorchDispatchMode (FakeTensorMode, make_fx, selective
checkpointing, FlopCounterMode) or a functorch transform. Both paths run the same launcher, so they
give the same numbers bit for bit (``tests/test_library.py``).
"""
from __future__ import annotations

import inspect
from typing import Callable, List, Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad as _fwad

__all__ = ["FastOp", "custom_op", "eager_call", "fast_ops", "first_order_only"]

_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)


_FAST_OPS: List["FastOp"] = []


def fast_ops() -> List["FastOp"]:
    """Every FastOp created so far (``import fastbert`` creates all of fastbert's)."""
    return list(_FAST_OPS)


def eager_call(args) -> bool:
    """True when a call with these arguments may skip the dispatcher: nothing traces or intercepts
    it and every tensor among ``args`` is a plain ``torch.Tensor`` (or Parameter)."""
    if torch.compiler.is_compiling():
        return False
    if _dispatch_modes is None or _dispatch_modes() > 0:
        return False
    if _functorch_active is None or _functorch_active():
        return False
    for a in args:
        if isinstance(a, Tensor) and type(a) not in _PLAIN_TENSORS:
            return False
    return True


# torch's older vmap (autograd.grad(is_grads_batched=True), autograd.functional.jacobian(
# vectorize=True)) batches the gradients a backward receives: a plain Tensor to Python, with no
# functorch layer active, but without storage. Checked on the gradient arguments of backward ops
# only, by asking for the data pointer (0.1 us; reading the dispatch keys took 5 us in a backward).
def _legacy_batched(t) -> bool:
    if not isinstance(t, Tensor):
        return False
    try:
        t.data_ptr()
    except RuntimeError:  # no storage: taken by the custom op, which torch runs per sample
        return True
    return False


def first_order_only(name: str, backward: Callable) -> Callable:
    """``backward`` (a custom op's autograd formula built on kernels, whose results are not
    differentiable) refusing to run where a graph of the gradient is being built
    (``create_graph=True``: gradient penalties, Hessians; autograd then runs it with grad mode on)
    instead of returning a gradient whose own gradient would silently be missing."""
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise NotImplementedError(
                f"{name}: the gradient of its gradient (backward with create_graph=True, "
                "torch.func.grad / jacrev / hessian) is not implemented by the Triton and CUDA "
                "kernels; run this computation with backend='torch', whose ops are differentiable twice")
        return backward(ctx, *grads)

    checked.__name__ = getattr(backward, "__name__", "backward")
    checked.__doc__ = backward.__doc__
    return checked


def _other_cuda_device(args) -> Optional[int]:
    """The CUDA device index of the first tensor among ``args`` when it is not the current device,
    else None (CPU tensors, or already current: the common case costs two attribute reads)."""
    for a in args:
        if isinstance(a, Tensor):
            if not a.is_cuda:
                return None
            index = a.get_device()
            return index if index != torch.cuda.current_device() else None
    return None


def _check_vmap_randomness(name: str) -> None:
    """Under ``torch.func.vmap``, a call that draws dropout masks honours vmap's ``randomness``
    as torch's random ops do: ``"error"`` (vmap's default) raises, ``"different"`` runs (each
    sample draws its own mask), and ``"same"``, which would need one mask shared by every sample
    where the kernels draw one per sample, is refused."""
    functorch = torch._C._functorch
    stack = getattr(functorch, "get_interpreter_stack", None)
    if stack is None or not hasattr(functorch, "CVmapInterpreterPtr"):
        return
    for interpreter in stack() or ():
        if interpreter.key() != functorch.TransformType.Vmap:
            continue
        randomness = functorch.CVmapInterpreterPtr(interpreter).randomness()
        if randomness == functorch.RandomnessType.Error:
            raise RuntimeError(
                f"{name}: vmap: called a random operation (dropout) while in randomness error "
                "mode; pass randomness='different' to torch.func.vmap for a mask per sample, or "
                "call it with dropout_p=0")
        if randomness == functorch.RandomnessType.Same:
            raise NotImplementedError(
                f"{name}: vmap(randomness='same') would need one dropout mask shared by every "
                "sample, and the Triton and CUDA kernels draw one per sample; use "
                "randomness='different', or dropout_p=0")


class FastOp:
    """A ``torch.library`` custom op (``op``) plus an eager fast path to its implementation.

    ``FastOp(name, impl)`` registers ``impl`` as the custom op ``name`` (mutating nothing; its type
    annotations give the schema). :meth:`register_fake` and :meth:`register_autograd` register with
    the custom op, the latter also building the eager ``autograd.Function``. Calling the FastOp with
    positional arguments picks the path (see the module docstring).
    """

    def __init__(self, name: str, impl: Callable, *, seeded: bool = False):
        self.name = name
        self.impl = impl
        # ``seeded``: the op draws a random seed (dropout) from torch's generator. Tagged as
        # torch's own random ops are, so that torch.compile never recomputes it (activation
        # checkpointing, the min-cut partitioner), which would draw another seed and give
        # gradients of another dropout mask than the forward's
        tags = (torch.Tag.nondeterministic_seeded,) if seeded else ()
        self.op = torch.library.custom_op(name, mutates_args=(), tags=tags)(impl)
        # where its dropout probability is, for vmap's randomness modes (see __call__)
        params = list(inspect.signature(impl).parameters)
        self._dropout_index = params.index("dropout_p") if seeded else None
        # the gradients a backward op takes (grad_out, ...), which torch's older vmap may batch
        self._grad_indices = [i for i, n in enumerate(params) if n.startswith("grad")]
        self.fake: Optional[Callable] = None
        self._function: Optional[type] = None
        self.__doc__ = impl.__doc__
        _FAST_OPS.append(self)

    def register_fake(self, fn: Callable) -> Callable:
        self.op.register_fake(fn)
        self.fake = fn
        return fn

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        backward = first_order_only(self.name, backward)
        torch.library.register_autograd(self.op, backward, setup_context=setup_context)

        def forward(*args):
            return self.impl(*args)

        self._function = type(f"{self.name.split('::')[-1]}_function", (torch.autograd.Function,),
                              {"forward": staticmethod(forward),
                               "setup_context": staticmethod(setup_context),
                               "backward": staticmethod(backward)})

    def __call__(self, *args):
        device = _other_cuda_device(args)
        if device is not None:
            # Triton launches on the current device, whatever the tensors' (the CUDA extension
            # sets a device guard itself): tensors on cuda:1 while cuda:0 is current would be
            # read by a kernel on the wrong GPU
            with torch.cuda.device(device):
                return self._call(*args)
        return self._call(*args)

    def _call(self, *args):
        if _fwad._current_level >= 0 and any(
                isinstance(a, Tensor) and _fwad.unpack_dual(a).tangent is not None for a in args):
            # torch would drop the tangent (the eager path) or give a zero one (the custom op)
            raise NotImplementedError(
                f"{self.name}: forward-mode differentiation (torch.func.jvp / jacfwd, "
                "torch.autograd.forward_ad) is not implemented by the Triton and CUDA kernels; use "
                "backend='torch' under it")
        if (self._dropout_index is not None and _functorch_active is not None
                and _functorch_active() and args[self._dropout_index] > 0):
            _check_vmap_randomness(self.name)
        if not eager_call(args) or (self._grad_indices and self._batched_grads(args)):
            try:
                return self.op(*args)
            except RuntimeError as e:  # torch's message names an autograd.Function the user never wrote
                if _functorch_active is not None and _functorch_active() and "functorch" in str(e):
                    raise NotImplementedError(
                        f"{self.name}: torch.func transforms that differentiate (grad, jacrev, jvp, "
                        "hessian, ...) cannot run the Triton and CUDA kernels' custom ops; use "
                        "backend='torch' under them (vmap alone works)") from e
                raise
        if self._function is not None and torch.is_grad_enabled() and any(
                isinstance(a, Tensor) and a.requires_grad for a in args):
            return self._function.apply(*args)
        return self.impl(*args)

    def _batched_grads(self, args) -> bool:
        for i in self._grad_indices:
            if _legacy_batched(args[i]):
                return True
        return False

    def __repr__(self) -> str:
        return f"FastOp({self.name!r})"


def custom_op(name: str, *, seeded: bool = False) -> Callable[[Callable], FastOp]:
    """Decorator: ``@custom_op("fastbert::x_fwd")`` on an annotated implementation gives a
    :class:`FastOp`; ``seeded=True`` for one that draws a dropout seed (see :class:`FastOp`)."""
    def deco(impl: Callable) -> FastOp:
        return FastOp(name, impl, seeded=seeded)

    return deco
