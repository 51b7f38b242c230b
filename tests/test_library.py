"""fastbert._library.FastOp: the eager fast path and the custom op give the same results bit for
bit, the eager path really skips the dispatcher, and anything that traces or intercepts ops gets the
custom op. Also torch.library.opcheck on every Triton custom op (schema, autograd registration,
fake implementation against the real one, AOT dispatch)."""
import sys
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastbert
from fastbert import _library, sparsity
from fastbert._library import eager_call, fast_ops
from fastbert.testing import DEVICE, assert_runs_in_fresh_python, rand, zero_fills_by_autograd

pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not fastbert.backends.interpreter_enabled(),
                                reason="Triton kernels on CPU need TRITON_INTERPRET=1")

FAST_OPS = {op.name: op for op in fast_ops()}


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


# Each case: (make inputs, run the public op on them) -> output; gradients flow to every leaf.
def _sdpa(g):
    q, k, v = _leaves(rand((2, 3, 17, 40)), rand((2, 3, 9, 40)), rand((2, 3, 9, 40)))
    bias = _leaves(rand((1, 3, 17, 9)))[0]
    out = fastbert.scaled_dot_product_attention(q, k, v, bias, dropout_p=0.3, backend="triton")
    return out, [q, k, v, bias]


def _varlen(g):
    q, k, v = _leaves(rand((12, 2, 16)), rand((12, 2, 16)), rand((12, 2, 16)))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=DEVICE)
    out = fastbert.varlen_attention(q, k, v, cu, cu, 7, 7, dropout_p=0.2, is_causal=True,
                                    backend="triton")
    return out, [q, k, v]


def _block_sparse(g):
    q, k, v = _leaves(rand((1, 2, 40, 16)), rand((1, 2, 40, 16)), rand((1, 2, 40, 16)))
    layout = sparsity.sliding_window(40, 16, window=1)
    out = fastbert.block_sparse_attention(q, k, v, layout, 16, dropout_p=0.2, backend="triton")
    return out, [q, k, v]


def _layer_norm(g):
    x, w, b = _leaves(rand((5, 97)), rand((97,)), rand((97,)))
    return fastbert.layer_norm(x, (97,), w, b, backend="triton"), [x, w, b]


def _add_layer_norm(g):
    x, r, w, b, xb = _leaves(rand((5, 97)), rand((5, 97)), rand((97,)), rand((97,)), rand((97,)))
    out, s = fastbert.add_layer_norm(x, r, w, b, input_bias=xb, dropout_p=0.25,
                                     return_residual=True, backend="triton")
    return out + s, [x, r, w, b, xb]


def _bias_gelu(g):
    x, b = _leaves(rand((7, 33), torch.float16), rand((33,), torch.float16))
    return fastbert.bias_gelu(x, b, "tanh", backend="triton"), [x, b]


CASES = {"sdpa": _sdpa, "varlen": _varlen, "block_sparse": _block_sparse, "layer_norm": _layer_norm,
         "add_layer_norm": _add_layer_norm, "bias_gelu": _bias_gelu}


def _run(case, seed):
    torch.manual_seed(seed)
    out, leaves = CASES[case](None)
    dy = torch.randn_like(out)
    out.backward(dy)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("case", sorted(CASES))
def test_eager_path_and_custom_op_agree_bit_for_bit(case, monkeypatch):
    seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
    fast = _run(case, seed)
    monkeypatch.setattr(_library, "eager_call", lambda args: False)  # every call through the op
    slow = _run(case, seed)
    for i, (a, b) in enumerate(zip(fast, slow)):
        assert a is not None and b is not None, f"{case}: result {i} missing"
        assert torch.equal(a, b), f"{case}: result {i} differs between the eager path and the op"


class _Counting:
    """Stands in for a FastOp's custom op and counts the calls that reach it."""

    def __init__(self, op):
        self.op, self.calls = op, 0

    def __call__(self, *args):
        self.calls += 1
        return self.op(*args)


@pytest.mark.parametrize("case", sorted(CASES))
def test_eager_calls_never_reach_the_dispatcher(case, monkeypatch):
    counters = {}
    for name, fop in FAST_OPS.items():
        counters[name] = _Counting(fop.op)
        monkeypatch.setattr(fop, "op", counters[name])
    _run(case, 0)
    assert sum(c.calls for c in counters.values()) == 0
    # Under a TorchDispatchMode (selective checkpointing, FlopCounterMode) the op is called.
    with _PassThrough():
        _run(case, 0)
    assert sum(c.calls for c in counters.values()) >= 2  # forward and backward


class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


_NO_DROPOUT = {  # each op family, without dropout (is_grads_batched reruns the same graph)
    "sdpa": (lambda q, k, v: fastbert.scaled_dot_product_attention(q, k, v, backend="triton"),
             [(1, 2, 17, 16), (1, 2, 9, 16), (1, 2, 9, 16)]),
    "varlen": (lambda q, k, v: fastbert.varlen_attention(
        q, k, v, *[torch.tensor(_CU, dtype=torch.int32, device=DEVICE)] * 2, 7, 7,
        backend="triton"), [(12, 2, 16)] * 3),
    "block_sparse": (lambda q, k, v: fastbert.block_sparse_attention(
        q, k, v, sparsity.sliding_window(40, 16, window=1), 16, backend="triton"),
        [(1, 2, 40, 16)] * 3),
    "layer_norm": (lambda x, w: fastbert.layer_norm(x, (24,), w, None, backend="triton"),
                   [(4, 24), (24,)]),
    "add_layer_norm": (lambda x, r: sum(fastbert.add_layer_norm(
        x, r, None, None, return_residual=True, backend="triton")), [(4, 24), (4, 24)]),
    "bias_gelu": (lambda x, b: fastbert.bias_gelu(x, b, backend="triton"), [(4, 24), (24,)]),
    "geglu": (lambda x: fastbert.geglu(x, backend="triton"), [(4, 24)]),
}
_CU = [0, 5, 12]


@pytest.mark.parametrize("case", sorted(_NO_DROPOUT))
def test_batched_gradients_of_torchs_older_vmap(case):
    """autograd.grad(is_grads_batched=True) (and jacobian(vectorize=True), built on it) hands the
    backward gradients batched by torch's older vmap: plain Tensors to Python. They reached the
    kernels ("Cannot access storage of BatchedTensorImpl"); they now take the custom op, which
    torch runs per sample."""
    fn, shapes = _NO_DROPOUT[case]
    leaves = _leaves(*[rand(s) for s in shapes])
    out = fn(*leaves)
    grads = rand((3,) + tuple(out.shape))
    with warnings.catch_warnings():  # torch's loop over the samples warns of its slowness
        warnings.simplefilter("ignore")
        batched = torch.autograd.grad(out, leaves, grads, retain_graph=True, is_grads_batched=True)
    for i in range(3):
        one = torch.autograd.grad(out, leaves, grads[i], retain_graph=True)
        for a, b in zip(batched, one):
            torch.testing.assert_close(a[i], b)


def test_launches_on_the_tensors_cuda_device(monkeypatch):
    """Triton launches on the current CUDA device: a call whose tensors are on another one (a
    model moved to cuda:1 without torch.cuda.set_device) runs under that device's guard. Checked
    with stand-ins here (no GPU): a tensor reporting cuda:1 while cuda:0 is current."""
    class OnCuda1(torch.Tensor):
        is_cuda = True

        def get_device(self):
            return 1

    entered = []

    class Guard:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Guard)
    t = torch.zeros(2).as_subclass(OnCuda1)
    assert _library._other_cuda_device((None, t)) == 1
    assert _library._other_cuda_device((torch.zeros(2), t)) is None  # the first tensor decides
    op = FAST_OPS["fastbert::gelu_fwd"]
    monkeypatch.setattr(op, "_call", lambda *args: "called")
    assert op(t, None, "none") == "called" and entered == [1]
    assert op(torch.zeros(2), None, "none") == "called" and entered == [1]  # CPU: no guard


@pytest.mark.parametrize("case", sorted(CASES))
def test_backward_materialises_no_zero_gradients_for_the_statistics(case):
    """The softmax statistics, LayerNorm mean / rstd and the dropout seed are outputs no loss uses:
    their gradients arrive as None, not as zero tensors made for each backward (marking them
    non-differentiable does not stop that; an (B, H, Lq, Lk) one for the CUDA unfused attention's
    probabilities)."""
    torch.manual_seed(0)
    out, leaves = CASES[case](None)
    with zero_fills_by_autograd() as made:
        out.backward(torch.randn_like(out))
    assert made == []
    assert all(t.grad is not None for t in leaves)


def test_every_triton_custom_op_is_a_fast_op():
    registered = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastbert::")}
    assert registered == set(FAST_OPS) and set(OPCHECKED) <= registered


def test_eager_call_sees_tracing_and_interception():
    x = torch.ones(3)
    assert eager_call((x, None, 0.5, torch.nn.Parameter(torch.ones(2))))
    with _PassThrough():
        assert not eager_call((x,))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert not eager_call((fake,))
    assert not eager_call((x, fake))  # a subclass argument, outside the mode
    seen = []
    torch.func.grad(lambda t: (seen.append(eager_call((t,))), t.sum())[1])(x)
    assert seen == [False]
    compiled = torch.compile(lambda t: t + (1.0 if eager_call((t,)) else 2.0), backend="eager",
                             fullgraph=True)
    assert torch.equal(compiled(x), x + 2.0)


def test_no_grad_and_inference_calls_skip_autograd():
    x, w, b = rand((3, 16)), rand((16,)), rand((16,))
    w.requires_grad_(True)
    with torch.no_grad():
        assert fastbert.layer_norm(x, (16,), w, b, backend="triton").grad_fn is None
    with torch.inference_mode():
        assert fastbert.layer_norm(x, (16,), w, b, backend="triton").grad_fn is None
    out = fastbert.layer_norm(x, (16,), w, b, backend="triton")
    assert out.grad_fn is not None and "layer_norm_fwd" in type(out.grad_fn).__name__


def _opcheck_args():
    q, k, v = rand((1, 2, 17, 16)), rand((1, 2, 9, 16)), rand((1, 2, 9, 16))
    x = rand((5, 24))
    w, b = rand((24,)), rand((24,))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    pq, pk = rand((9, 2, 16)), rand((9, 2, 16))
    layout = sparsity.sliding_window(17, 16, window=1).bool()
    bias = rand((1, 2, 17, 9))
    return {
        "fastbert::attention_fwd": (q, k, v, bias, 0.0, False, 0.25),
        "fastbert::varlen_attention_fwd": (pq, pk, pk.clone(), cu, cu, 5, 5, 0.0, True, 0.25),
        "fastbert::block_sparse_attention_fwd": (q, q.clone(), q.clone(), layout, 16, None, 0.0,
                                                  0.25),
        "fastbert::layer_norm_fwd": (x, w, b, 1, 1e-5, None),
        "fastbert::add_layer_norm_fwd": (x, x.clone(), w, b, b.clone(), 1e-5, 0.0, True),
        "fastbert::gelu_fwd": (x, b, "none"),
        "fastbert::geglu_fwd": (x, None, "tanh"),
    }


OPCHECKED = ["fastbert::attention_fwd", "fastbert::varlen_attention_fwd",
             "fastbert::block_sparse_attention_fwd", "fastbert::layer_norm_fwd",
             "fastbert::add_layer_norm_fwd", "fastbert::gelu_fwd", "fastbert::geglu_fwd"]


@pytest.mark.parametrize("name", OPCHECKED, ids=lambda n: n.split("::")[1])
def test_opcheck(name):
    args = _opcheck_args()[name]
    _opcheck(name, args)


def test_opcheck_layer_norm_into_fp32():
    """A 16-bit input normalised into an fp32 output (layer_norm under CUDA autocast)."""
    x = rand((5, 24), torch.float16, requires_grad=True)
    w, b = rand((24,), requires_grad=True), rand((24,), requires_grad=True)
    _opcheck("fastbert::layer_norm_fwd", (x, w, b, 1, 1e-5, torch.float32))


@pytest.mark.parametrize("return_residual", [False, True])
def test_opcheck_add_layer_norm_mixed_dtypes(return_residual):
    """fp16 input + fp32 residual: every output (the empty pre-norm-sum placeholder too) has the
    fake's dtype, the promoted one."""
    x = rand((5, 24), torch.float16)
    r, w, b = rand((5, 24)), rand((24,)), rand((24,))
    _opcheck("fastbert::add_layer_norm_fwd", (x, r, w, b, None, 1e-5, 0.0, return_residual))


def test_opcheck_attention_with_alibi_gqa_and_window():
    q, k, v = rand((1, 4, 17, 16), requires_grad=True), *(rand((1, 2, 9, 16), requires_grad=True)
                                                          for _ in range(2))
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=DEVICE)  # constants: no grad
    torch.library.opcheck(FAST_OPS["fastbert::attention_fwd"].op,
                          (q, k, v, None, 0.0, True, 0.25, slopes))
    torch.library.opcheck(FAST_OPS["fastbert::attention_fwd"].op,  # and a sliding window
                          (q, k, v, None, 0.0, False, 0.25, slopes, 3, 2))


def _opcheck(name, args):
    args = tuple(a.requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                 else a for a in args)
    torch.library.opcheck(FAST_OPS[name].op, args)


# ----------------------------------------------------------------------------------------------
# Activation checkpointing: the eager path recomputes with the same dropout mask; selective
# checkpointing (a TorchDispatchMode) sees fastbert's ops by name and can keep their outputs.
# ----------------------------------------------------------------------------------------------
def _dropout_attention(q, k, v):
    return fastbert.scaled_dot_product_attention(q, k, v, dropout_p=0.3, backend="triton")


def _counting_forward_kernel(monkeypatch):
    from fastbert.kernels import attention as kern

    calls = []
    real = kern.attention_fwd

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(kern, "attention_fwd", counted)
    return calls


def _grads_of(fn, leaves, dy, seed):
    torch.manual_seed(seed)
    xs = _leaves(*leaves)
    out = fn(*xs)
    out.backward(dy)
    return [out.detach()] + [x.grad for x in xs]


def test_checkpoint_recomputes_the_same_dropout_mask(monkeypatch):
    from torch.utils.checkpoint import checkpoint

    leaves = (rand((1, 2, 17, 16)), rand((1, 2, 9, 16)), rand((1, 2, 9, 16)))
    dy = rand((1, 2, 17, 16))
    seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
    plain = _grads_of(_dropout_attention, leaves, dy, seed)
    calls = _counting_forward_kernel(monkeypatch)
    ckpt = _grads_of(lambda *x: checkpoint(_dropout_attention, *x, use_reentrant=False),
                     leaves, dy, seed)
    assert len(calls) == 2  # the forward ran again in the backward pass
    for a, b in zip(plain, ckpt):
        assert torch.equal(a, b)


_SEEDED = {  # each op that draws a dropout seed: (function of its leaves, leaf shapes)
    "attention_fwd": (lambda q, k, v: fastbert.scaled_dot_product_attention(
        q, k, v, dropout_p=0.3, backend="triton"), [(1, 2, 17, 16), (1, 2, 9, 16), (1, 2, 9, 16)]),
    "varlen_attention_fwd": (lambda q, k, v: fastbert.varlen_attention(
        q, k, v, *[torch.tensor(_CU, dtype=torch.int32, device=DEVICE)] * 2, 7, 7, dropout_p=0.3,
        backend="triton"), [(12, 2, 16)] * 3),
    "block_sparse_attention_fwd": (lambda q, k, v: fastbert.block_sparse_attention(
        q, k, v, sparsity.sliding_window(40, 16, window=1), 16, dropout_p=0.3, backend="triton"),
        [(1, 2, 40, 16)] * 3),
    "add_layer_norm_fwd": (lambda x, r: fastbert.add_layer_norm(
        x, r, None, None, dropout_p=0.4, return_residual=True, backend="triton")[1],
        [(6, 40), (6, 40)]),
}


def test_only_the_ops_that_draw_a_seed_are_tagged_seeded():
    """torch.compile never recomputes an op tagged nondeterministic_seeded (as torch's dropout);
    the others stay free to be recomputed."""
    tagged = {op.name.split("::")[1] for op in fast_ops()
              if torch.Tag.nondeterministic_seeded in getattr(torch.ops.fastbert,
                                                              op.name.split("::")[1]).default.tags}
    assert tagged == set(_SEEDED)


@pytest.mark.parametrize("name", sorted(_SEEDED))
def test_compiled_checkpoint_keeps_the_forwards_dropout_mask(name):
    """torch.compile of a checkpointed region recomputes it inside the compiled backward; an
    untagged op drew a new seed there, so its gradients were those of another dropout mask
    (dV off by 2.2 for attention) with the same forward output."""
    from torch.utils.checkpoint import checkpoint

    fn, shapes = _SEEDED[name]
    leaves = [rand(s) for s in shapes]
    seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
    torch.manual_seed(seed)
    dy = rand(fn(*leaves).shape)
    plain = _grads_of(fn, leaves, dy, seed)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *x: checkpoint(fn, *x, use_reentrant=False),
                             backend="aot_eager", fullgraph=True)
    ckpt = _grads_of(compiled, leaves, dy, seed)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(_SEEDED))
def test_vmap_randomness_modes_with_dropout(name):
    """As torch's random ops: vmap's default randomness="error" raises, "different" draws a mask
    per sample; "same" is refused (the kernels draw per sample). Without dropout, vmap runs."""
    fn, shapes = _SEEDED[name]
    one = [rand(s) for s in shapes]
    batched = [t.expand(3, *t.shape).contiguous() for t in one]  # three identical samples
    with pytest.raises(RuntimeError, match="randomness error mode"):
        torch.func.vmap(fn)(*batched)
    with pytest.raises(NotImplementedError, match="randomness='same'"):
        torch.func.vmap(fn, randomness="same")(*batched)
    with warnings.catch_warnings():  # torch's loop over the samples warns of its slowness
        warnings.simplefilter("ignore")
        out = torch.func.vmap(fn, randomness="different")(*batched)
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])


def test_vmap_without_dropout_runs():
    q, k, v = rand((3, 2, 17, 16)), rand((2, 9, 16)), rand((2, 9, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = torch.func.vmap(lambda t: fastbert.scaled_dot_product_attention(t, k, v,
                                                                           backend="triton"))(q)
    ref = fastbert.scaled_dot_product_attention(q, k.expand(3, 2, 9, 16), v.expand(3, 2, 9, 16),
                                                backend="triton")
    torch.testing.assert_close(out, ref)


def test_selective_checkpointing_sees_and_saves_the_attention_op(monkeypatch):
    from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                        create_selective_checkpoint_contexts)

    seen = []

    def policy(ctx, op, *args, **kwargs):
        if op is torch.ops.fastbert.attention_fwd.default:
            seen.append(op)
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    leaves = (rand((1, 2, 17, 16)), rand((1, 2, 9, 16)), rand((1, 2, 9, 16)))
    dy = rand((1, 2, 17, 16))
    seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
    plain = _grads_of(_dropout_attention, leaves, dy, seed)
    calls = _counting_forward_kernel(monkeypatch)
    sac = _grads_of(lambda *x: checkpoint(
        _dropout_attention, *x, use_reentrant=False,
        context_fn=lambda: create_selective_checkpoint_contexts(policy)), leaves, dy, seed)
    assert seen and len(calls) == 1  # saved, not recomputed
    for a, b in zip(plain, sac):
        assert torch.equal(a, b)


def test_torch_export_keeps_one_op_per_pass():
    """torch.export traces the custom ops (fake tensors), and the exported program runs them."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = fastbert.nn.LayerNorm(32, backend="triton")

        def forward(self, q, k, v, mask):
            o = fastbert.scaled_dot_product_attention(q, k, v, mask, backend="triton")
            return self.norm(o.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1))

    block = Block()
    q, k, v = (rand((2, 2, 9, 16)) for _ in range(3))
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool, device=DEVICE)
    mask[1, ..., 5:] = False
    program = torch.export.export(block, (q, k, v, mask))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("fastbert.attention_fwd.default") == 1
    assert targets.count("fastbert.layer_norm_fwd.default") == 1
    assert not any("expand" in t for t in targets), targets  # no stray ops from argument checks
    assert torch.equal(program.module()(q, k, v, mask), block(q, k, v, mask))


def test_fx_symbolic_trace_is_refused_clearly():
    """torch.fx.symbolic_trace feeds Proxy objects, which fastbert's checks cannot read: the error
    says so and names torch.export / torch.compile (it said only "got Proxy")."""
    import fastbert.nn as fnn

    for module in (fnn.LayerNorm(8), fnn.TransformerEncoderLayer(8, 2, 16, batch_first=True)):
        with pytest.raises(TypeError, match="symbolic_trace cannot trace.*torch.export"):
            torch.fx.symbolic_trace(module)


_FRESH_COMPILE = """
import torch, torch.nn as nn
import fastbert, fastbert.nn as fnn
torch.manual_seed(0)
layer = fnn.TransformerEncoderLayer.from_torch(
    nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True))
compiled = torch.compile(layer, fullgraph=True, dynamic=True)
for length in (17, 23):
    x = torch.randn(2, length, 32)
    mask = torch.zeros(2, length, dtype=torch.bool)
    mask[1, -3:] = True
    torch.testing.assert_close(compiled(x, src_key_padding_mask=mask), layer(x, src_key_padding_mask=mask))
# one frame for every shape: nothing the first trace set (a lazily imported global) fails a guard
from torch._dynamo.testing import CompileCounter
counter = CompileCounter()
norm = torch.compile(lambda x, w: fastbert.layer_norm(x, (24,), w, None),
                     backend=counter, dynamic=True, fullgraph=True)
for rows in (5, 7, 9):
    norm(torch.randn(rows, 24), torch.randn(24))
assert counter.frame_count == 1, counter.frame_count
print("compiled ok")
"""


def test_fullgraph_compile_in_a_fresh_process():
    """torch.compile(fullgraph=True) before any eager call: backend selection, traced, probes the
    environment (can triton be imported, does the CUDA extension load) without tracing an import.
    A fresh interpreter, because this process has run those probes already. Default backend (auto:
    torch on CPU), dynamic sequence lengths; and one frame for three shapes."""
    if DEVICE == "cuda":
        pytest.skip("the CPU run covers the probes; a GPU run would compile kernels for minutes")
    assert_runs_in_fresh_python(_FRESH_COMPILE, "compiled ok")


def test_constant_result_marks_as_torch_does(monkeypatch):
    """backends.constant_result sets, without importing torch._dynamo, exactly what
    torch.compiler.assume_constant_result sets (a torch that changes its marker fails here)."""
    from fastbert.backends import constant_result

    def ours():
        return 1

    def theirs():
        return 1

    monkeypatch.delitem(sys.modules, "torch._dynamo", raising=False)
    assert constant_result(ours) is ours
    monkeypatch.undo()
    assert torch.compiler.assume_constant_result(theirs) is theirs
    assert vars(ours) == vars(theirs) and vars(ours)


def test_import_leaves_dynamo_unloaded():
    """``import fastbert`` does not load torch._dynamo (about 0.8 s); torch.compile loads it."""
    assert_runs_in_fresh_python(
        "import sys, fastbert, fastbert.nn, fastbert.sparsity\n"
        "print('dynamo loaded' if 'torch._dynamo' in sys.modules else 'dynamo not loaded')",
        "dynamo not loaded")


@pytest.mark.parametrize("path", ["eager", "custom_op"])
def test_double_backward_is_refused_clearly_where_kernels_run(path, monkeypatch):
    """The kernels' gradients are not differentiable: a graph of the gradient (create_graph=True,
    e.g. a gradient penalty) raises NotImplementedError naming the op and backend='torch', whose
    ops give the second derivative, instead of a gradient whose own gradient is silently 0;
    torch.func.grad likewise gets a clear error. First-order backward is unaffected."""
    if path == "custom_op":
        monkeypatch.setattr(_library, "eager_call", lambda args: False)
    x = rand((4, 8), torch.float32, requires_grad=True)
    for f in (lambda t, b: fastbert.gelu(t, backend=b),
              lambda t, b: fastbert.layer_norm(t, (8,), None, None, backend=b)):
        g, = torch.autograd.grad(f(x, "torch").pow(3).sum(), x, create_graph=True)
        h, = torch.autograd.grad(g.pow(2).sum(), x)  # the torch backend: differentiable twice
        assert torch.isfinite(h).all() and h.abs().sum() > 0
        with pytest.raises(NotImplementedError, match="gradient of its gradient.*backend='torch'"):
            torch.autograd.grad(f(x, "triton").pow(3).sum(), x, create_graph=True)
        g1, = torch.autograd.grad(f(x, "triton").pow(3).sum(), x)
        torch.testing.assert_close(g1, g.detach(), atol=1e-4, rtol=1e-4)
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.grad(lambda t: fastbert.gelu(t, backend="triton").sum())(x.detach())


@pytest.mark.parametrize("path", ["eager", "custom_op"])
def test_forward_mode_ad_is_refused_clearly_where_kernels_run(path, monkeypatch):
    """Forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad) through a kernel raises
    NotImplementedError naming backend='torch' (torch would drop the tangent on the eager path and
    give a zero one through the custom op); the torch backend gives the right tangent."""
    import torch.autograd.forward_ad as fwad

    if path == "custom_op":
        monkeypatch.setattr(_library, "eager_call", lambda args: False)
    x, t = rand((3, 8), torch.float32), rand((3, 8), torch.float32)
    w = rand((8,), torch.float32)
    for f in (lambda a, b: fastbert.gelu(a, backend=b),
              lambda a, b: fastbert.layer_norm(a, (8,), w, None, backend=b)):
        _, tangent = torch.func.jvp(lambda a: f(a, "torch"), (x,), (t,))
        expected = torch.autograd.functional.jvp(lambda a: f(a, "torch"), x, t)[1]
        torch.testing.assert_close(tangent, expected)
        with pytest.raises(NotImplementedError, match="forward-mode.*backend='torch'"):
            torch.func.jvp(lambda a: f(a, "triton"), (x,), (t,))
        with pytest.raises(NotImplementedError, match="forward-mode"):
            torch.func.jacfwd(lambda a: f(a, "triton"))(x[:1])
        with fwad.dual_level(), pytest.raises(NotImplementedError, match="forward-mode"):
            f(fwad.make_dual(x, t), "triton")
        with fwad.dual_level():  # a dual level alone (no tangent on the inputs) is fine
            torch.testing.assert_close(f(x, "triton"), f(x, "torch"), atol=1e-5, rtol=1e-5)
