"""fastbert.optimize / fastbert.restore on plain torch models (HuggingFace models: tests/test_hf.py).

Checked: every supported module is swapped and reported, the very same Parameter objects stay in
the model (``is``), state_dict keys do not change, outputs and gradients equal the original's (eval
with padding; train with dropout 0), restore() brings back the original module objects, and what
is left is reported with its reason.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbert.nn as fnn
from fastbert.optimize import Left, OptimizeReport, Swapped, optimize, restore
from fastbert.testing import assert_close

E, H, N, L = 16, 4, 3, 9

# torch's own encoder (the reference) packs padded batches into its prototype nested tensors
pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")


class ToyModel(nn.Module):
    """A small model with every torch module optimize() knows, plus a shared LayerNorm."""

    def __init__(self, dropout=0.0, norm_first=False):
        super().__init__()
        self.embed = nn.Linear(5, E)
        self.norm_in = nn.LayerNorm(E)
        layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=24, dropout=dropout, batch_first=True,
                                           activation="gelu", norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=not norm_first)
        self.cross = nn.MultiheadAttention(E, H, dropout=dropout, kdim=7, vdim=7, batch_first=True)
        self.head = nn.Sequential(nn.Linear(E, E), nn.GELU(approximate="tanh"), self.norm_in)

    def forward(self, x, memory, kpm):
        h = self.norm_in(self.embed(x))
        h = self.encoder(h, src_key_padding_mask=kpm)
        c, _ = self.cross(h, memory, memory, need_weights=False)
        return self.head(h + c)


def _inputs():
    x = torch.randn(N, L, 5)
    memory = torch.randn(N, 4, 7)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1, 5:] = True
    kpm[2, 2:] = True
    return x, memory, kpm


def _params(model):
    return dict(model.named_parameters(remove_duplicate=False))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_optimize_swaps_keeps_parameters_and_matches(norm_first):
    torch.manual_seed(0)
    model = ToyModel(norm_first=norm_first)
    reference = copy.deepcopy(model)
    before = _params(model)
    keys = list(model.state_dict())
    originals = {name: mod for name, mod in model.named_modules()}

    report = optimize(model, backend="torch")

    assert isinstance(report, OptimizeReport) and report.backend == "torch"
    swapped = {s.path: s for s in report.swapped}
    assert set(swapped) == {"norm_in", "encoder.layers.0", "encoder.layers.1", "cross", "head.1",
                            "head.2"} - {"head.2"}  # head.2 is norm_in again: swapped once (shared)
    assert swapped["encoder.layers.0"] == Swapped("encoder.layers.0", "torch.nn.TransformerEncoderLayer",
                                                  "fastbert.nn.TransformerEncoderLayer")
    assert report.counts() == {"torch.nn.LayerNorm": 1, "torch.nn.TransformerEncoderLayer": 2,
                               "torch.nn.MultiheadAttention": 1, "torch.nn.GELU": 1}
    assert type(model.encoder.layers[0]) is fnn.TransformerEncoderLayer
    assert type(model.encoder.layers[0].self_attn) is fnn.MultiheadAttention
    assert type(model.cross) is fnn.MultiheadAttention and type(model.head[1]) is fnn.GELU
    assert model.head[2] is model.norm_in and type(model.norm_in) is fnn.LayerNorm  # sharing kept
    assert all(m.backend == "torch" for m in (model.cross, model.norm_in, model.head[1]))
    # the very same Parameter objects, the same state_dict keys
    after = _params(model)
    assert list(after) == list(before)
    assert all(after[k] is before[k] for k in before)
    assert list(model.state_dict()) == keys
    assert "encoder.layers.0" in str(report) and "fastbert.nn.MultiheadAttention" in str(report)

    # eval with padding (torch's encoder runs its nested-tensor fast path on the reference)
    ref64 = copy.deepcopy(reference).double()
    x, memory, kpm = _inputs()
    real = ~kpm
    for m in (model, reference, ref64):
        m.eval()
    with torch.no_grad():
        a, b = reference(x, memory, kpm), model(x, memory, kpm)
        a64 = ref64(x.double(), memory.double(), kpm)
    assert_close(b[real], a64[real], a[real], name="eval output")

    # train mode, dropout 0: same outputs and gradients (the fp64 model is the reference)
    for m in (model, reference, ref64):
        m.train()
    outs = [m(x.to(dt), memory.to(dt), kpm) for m, dt in
            ((model, torch.float32), (reference, torch.float32), (ref64, torch.float64))]
    assert_close(outs[0], outs[2], outs[1], name="train output")
    g = torch.randn_like(outs[2])
    for o in outs:
        o.backward(g.to(o.dtype))
    low_params, ref_params = _params(reference), _params(ref64)
    for name, p in after.items():
        assert_close(p.grad, ref_params[name].grad, low_params[name].grad, name=f"grad {name}")

    # restore: the original module objects come back, still on the same parameters
    assert restore(model) == 5
    for name, mod in model.named_modules():
        assert mod is originals[name], name
    assert all(_params(model)[k] is before[k] for k in before)
    assert model.encoder.use_nested_tensor is (not norm_first)
    assert restore(model) == 0


def test_optimizer_step_after_optimize_updates_the_model():
    torch.manual_seed(0)
    model = ToyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before optimize()
    optimize(model)
    x, memory, kpm = _inputs()
    w = model.encoder.layers[0].linear1.weight.detach().clone()
    model(x, memory, kpm).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(model.encoder.layers[0].linear1.weight, w)


def test_transformer_encoder_nested_fast_path_is_turned_off():
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=24, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=True))
    reference = copy.deepcopy(model).eval()
    assert model[0].use_nested_tensor
    optimize(model)
    assert not model[0].use_nested_tensor
    model.eval()
    x = torch.randn(N, L, E)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[0, 3:] = True
    with torch.no_grad():  # eval + no grad + padding: where torch would pack into nested tensors
        a = reference[0](x, src_key_padding_mask=kpm)
        b = model[0](x, src_key_padding_mask=kpm)
    assert_close(b[~kpm], a[~kpm].double(), a[~kpm], atol=1e-5)
    restore(model)
    assert model[0].use_nested_tensor


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_optimize_padding_free_swaps_the_torch_encoder(norm_first):
    """padding_free=True: the nn.TransformerEncoder becomes one fastbert.nn.TransformerEncoder (its
    layers converted inside it), same Parameters and state_dict; the model's output on the real
    tokens equals the original's in train mode (the encoder's padded positions are 0 instead of
    values no real token reads); restore() gives the torch encoder back."""
    torch.manual_seed(0)
    model = ToyModel(norm_first=norm_first)
    reference = copy.deepcopy(model)
    keys, params = list(model.state_dict()), _params(model)
    report = optimize(model, backend="torch", padding_free=True)
    swapped = {s.path: s.replacement for s in report.swapped}
    assert swapped["encoder"] == "fastbert.nn.TransformerEncoder", str(report)
    assert not any(p.startswith("encoder.") for p in swapped)
    assert all(type(layer) is fnn.TransformerEncoderLayer for layer in model.encoder.layers)
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in _params(model).items())
    x, memory, kpm = _inputs()
    real = ~kpm
    ref64 = copy.deepcopy(reference).double()
    out, low = model(x, memory, kpm), reference(x, memory, kpm)
    ref = ref64(x.double(), memory.double(), kpm)
    assert_close(out[real], ref[real], low[real], name="output (real tokens)")
    assert restore(model) == len(report.swapped)
    assert type(model.encoder) is nn.TransformerEncoder
    assert all(type(layer) is nn.TransformerEncoderLayer for layer in model.encoder.layers)


def test_optimize_twice_is_harmless():
    model = ToyModel()
    first = optimize(model)
    second = optimize(model)
    assert len(first.swapped) == 5 and second.swapped == [] and second.left == []
    assert restore(model) == 5


def test_subclasses_and_root_are_left_with_reasons():
    class MyNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(MyNorm(E), nn.GELU())
    report = optimize(model)
    assert [s.path for s in report.swapped] == ["1"]
    assert len(report.left) == 1 and isinstance(report.left[0], Left)
    assert report.left[0].path == "0" and report.left[0].module.endswith("MyNorm")
    assert "subclass of torch.nn.LayerNorm" in report.left[0].reason
    assert isinstance(model[0], MyNorm) and type(model[0]) is MyNorm

    bare = nn.LayerNorm(E)
    report = optimize(bare)
    assert report.swapped == [] and report.left[0].path == ""
    assert "root module" in report.left[0].reason and type(bare) is nn.LayerNorm


def test_optimize_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        optimize("not a model")
    with pytest.raises(ValueError, match="backend"):
        optimize(nn.Sequential(nn.LayerNorm(4)), backend="tpu")
    with pytest.raises(TypeError, match="model"):
        restore(3)


def test_restore_keeps_replaced_parameter_objects():
    """If something swaps a Parameter object on the fastbert module after optimize(), restore() hands
    that object to the original module (it never resurrects a stale parameter)."""
    model = nn.Sequential(nn.LayerNorm(E))
    optimize(model)
    new_weight = nn.Parameter(torch.randn(E))
    model[0].weight = new_weight
    restore(model)
    assert type(model[0]) is nn.LayerNorm and model[0].weight is new_weight


@pytest.mark.parametrize("padding_free", [False, True])
@pytest.mark.parametrize("first", ["train", "eval"])
def test_restore_hands_back_the_mode_set_while_optimized(first, padding_free):
    """model.eval() / model.train() while optimized reaches only the fastbert modules: restore()
    gives the originals' own submodules that mode (they kept the one of optimize() time, so a
    model switched to eval ran the restored attention with dropout)."""
    layer = nn.TransformerEncoderLayer(E, 2, 40, dropout=0.5, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                          nn.MultiheadAttention(E, 2, dropout=0.5, batch_first=True))
    model.train(first == "train")
    optimize(model, backend="torch", padding_free=padding_free)
    model.train(first != "train")
    restore(model)
    assert type(model[1]) is nn.MultiheadAttention
    assert {m.training for m in model.modules()} == {first != "train"}
    if first == "train":  # now in eval: deterministic
        x = torch.randn(2, 6, E)
        assert torch.equal(model[0](x), model[0](x))


def test_restore_leaves_the_mode_of_shared_submodules():
    model = nn.Sequential(nn.TransformerEncoderLayer(E, 2, 40, batch_first=True))
    optimize(model, backend="torch")
    model.train()
    model[0].dropout1.eval()  # the user's choice on a submodule the replacement shares
    restore(model)
    assert model[0].self_attn.training and not model[0].dropout1.training


def test_deepcopy_and_state_dict_roundtrip_after_optimize():
    torch.manual_seed(0)
    model = ToyModel()
    optimize(model)
    clone = copy.deepcopy(model)
    x, memory, kpm = _inputs()
    model.eval()
    clone.eval()
    with torch.no_grad():
        assert torch.equal(model(x, memory, kpm), clone(x, memory, kpm))
    fresh = ToyModel()
    fresh.load_state_dict(model.state_dict(), strict=True)  # a torch model loads it as is
    fresh.eval()
    with torch.no_grad():
        a, b = fresh(x, memory, kpm), model(x, memory, kpm)
    assert_close(b[~kpm], a[~kpm].double(), a[~kpm], atol=1e-5)
    assert restore(clone) == 5


def test_functional_relu_layer_and_unbatched():
    """A relu layer (activation applied unfused) and an unbatched call through the swapped layer."""
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=24, dropout=0.0, activation=F.relu)
    model = nn.Sequential(layer)
    reference = copy.deepcopy(model)
    optimize(model)
    x = torch.randn(L, E)
    assert_close(model(x), reference(x).double(), reference(x), atol=1e-5)


def test_module_with_wrapped_forward_is_left():
    """accelerate-style hooks replace ``module.forward`` on the instance: swapping would bypass them."""
    norm = nn.LayerNorm(E)
    original_forward = norm.forward
    norm.forward = lambda x: original_forward(x) + 1.0
    model = nn.Sequential(norm, nn.GELU())
    report = optimize(model)
    assert [s.path for s in report.swapped] == ["1"]
    assert report.left[0].path == "0" and "forward is replaced" in report.left[0].reason
    assert model[0] is norm
    with pytest.raises(ValueError, match="forward is replaced"):
        fnn.LayerNorm.from_torch(norm)


def test_module_whose_own_forward_was_put_back_is_swapped():
    """transformers 4.5x wraps a module's forward on the instance while it collects outputs and
    then sets the original bound method back (``m.forward = original``): the class's own forward,
    so the module is swapped, and the new module runs its own forward, not the old one's."""
    norm = nn.LayerNorm(E)
    norm.forward = norm.forward
    model = nn.Sequential(norm)
    report = optimize(model)
    assert [s.path for s in report.swapped] == ["0"] and not report.left
    assert "forward" not in model[0].__dict__
    x = torch.randn(L, E)
    assert_close(model(x), F.layer_norm(x.double(), (E,), norm.weight.double(), norm.bias.double()),
                 norm(x), atol=1e-5)


def test_hooked_modules_are_left_and_their_hooks_run():
    """A replacement runs neither the hooks of the module it replaces nor those of the submodules it
    computes itself: a module with a forward (pre-)hook or a backward hook in its tree stays, with
    the reason; the rest is swapped; hooks registered on a fastbert module after optimize() run."""
    model = nn.Sequential(nn.Linear(E, E), nn.LayerNorm(E), nn.GELU(),
                          nn.TransformerEncoderLayer(E, H, dim_feedforward=24, dropout=0.0), nn.LayerNorm(E))
    model[1].register_forward_hook(lambda m, args, out: out * 0)
    seen = []
    model[2].register_forward_pre_hook(lambda m, args: seen.append("gelu"))
    model[3].linear1.register_forward_hook(lambda m, args, out: seen.append("linear1"))
    model[4].register_full_backward_hook(lambda m, gin, gout: seen.append("backward"))
    reference = copy.deepcopy(model)
    report = optimize(model)
    assert [s.path for s in report.swapped] == ["3.self_attn", "3.norm1", "3.norm2"], str(report)
    reasons = {entry.path: entry.reason for entry in report.left}
    assert "a forward hook" in reasons["1"] and "a forward pre-hook" in reasons["2"]
    assert "submodule linear1" in reasons["3"] and "a backward hook" in reasons["4"]
    assert type(model[1]) is nn.LayerNorm and type(model[3]) is nn.TransformerEncoderLayer
    x = torch.randn(L, 2, E, requires_grad=True)
    out = model(x)
    out.sum().backward()
    assert seen == ["gelu", "linear1", "backward"]
    expected = reference(x)
    assert_close(out, reference.double()(x.double()), expected, atol=1e-5)
    late = []
    model[3].norm1.register_forward_hook(lambda m, args, out: late.append(out.shape))
    model(x)
    assert late == [(L, 2, E)]


def test_a_module_under_two_names_gets_one_replacement():
    """``self.final_norm = self.norm``: both names get the same replacement (named_children would
    show the module once), a second optimize() changes nothing, restore() puts it back under both."""
    model = nn.Module()
    model.norm = nn.LayerNorm(E)
    model.final_norm = model.norm
    report = optimize(model)
    assert [s.path for s in report.swapped] == ["norm"]
    assert isinstance(model.final_norm, fnn.LayerNorm) and model.final_norm is model.norm
    assert optimize(model).swapped == [] and model.final_norm is model.norm
    assert restore(model) == 1
    assert type(model.norm) is nn.LayerNorm and model.final_norm is model.norm


class _ScaledLayer(nn.TransformerEncoderLayer):
    """A user's layer: torch's layer with its own forward (a learned-free residual rescale)."""

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        out = super().forward(src, src_mask=src_mask, src_key_padding_mask=src_key_padding_mask,
                              is_causal=is_causal)
        return 0.5 * out + src.flip(-1)


def test_padding_free_leaves_an_encoder_of_subclassed_layers():
    """padding_free=True on a torch.nn.TransformerEncoder whose layers are a user's subclass of
    nn.TransformerEncoderLayer with its own forward: the encoder is not made padding-free (that
    would convert the layers and lose their forward: a mutant accepting subclasses survived), it
    is reported as left with the reason, each layer is left as a subclass, and the model's output
    and gradients equal the original's (train mode, dropout 0, with a padding mask)."""
    torch.manual_seed(0)
    layer = _ScaledLayer(E, H, dim_feedforward=24, dropout=0.0, batch_first=True, activation="gelu")
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    reference = copy.deepcopy(model)
    report = optimize(model, backend="torch", padding_free=True)
    left = {entry.path: entry.reason for entry in report.left}
    assert "0" in left and "not made padding-free" in left["0"] and "_ScaledLayer" in left["0"], str(report)
    assert "subclass of torch.nn.TransformerEncoderLayer" in left["0.layers.0"], str(report)
    assert type(model[0]) is nn.TransformerEncoder
    assert all(type(layer) is _ScaledLayer for layer in model[0].layers)
    x = torch.randn(N, L, E, requires_grad=True)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1, 5:] = True
    kpm[2, 2:] = True
    x_ref = x.detach().clone().requires_grad_(True)
    out, want = model[0](x, src_key_padding_mask=kpm), reference[0](x_ref, src_key_padding_mask=kpm)
    real = ~kpm
    assert_close(out[real], want[real].double(), want[real], atol=1e-5, name="output (real tokens)")
    g = torch.randn_like(out) * real[..., None]
    out.backward(g)
    want.backward(g)
    assert_close(x.grad, x_ref.grad.double(), x_ref.grad, atol=1e-5, name="grad src")
    restore(model)
    assert all(type(layer) is _ScaledLayer for layer in model[0].layers)


def test_layer_with_a_submodule_forward_replaced_on_the_instance_is_left():
    """A forward replaced on a submodule's instance (accelerate's device hooks, a LoRA patch on
    linear1) keeps the module holding it: the layer is left with the reason naming the submodule,
    its other submodules are swapped one by one, and the output equals the original's, the patch
    included (before and after)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=24, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer)
    plain = copy.deepcopy(model)
    linear1_forward = layer.linear1.forward
    layer.linear1.forward = lambda x: 2.0 * linear1_forward(x) + 0.25
    x = torch.randn(N, L, E)
    before = model(x)
    assert not torch.allclose(before, plain(x), atol=1e-3)  # the patch changes the output
    report = optimize(model, backend="torch")
    reasons = {entry.path: entry.reason for entry in report.left}
    assert "0" in reasons and "submodule linear1" in reasons["0"], str(report)
    assert "replaced on the instance" in reasons["0"]
    assert type(model[0]) is nn.TransformerEncoderLayer and model[0] is layer
    assert {s.path for s in report.swapped} == {"0.self_attn", "0.norm1", "0.norm2"}, str(report)
    assert_close(model(x), before.double(), before, atol=1e-5)
