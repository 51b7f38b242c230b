"""The public API's argument checks and backend dispatch (through the torch backend)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert import backends

f32 = torch.float32


def qkv(b=2, h=3, lq=5, lk=7, d=8, dtype=f32):
    return (torch.randn(b, h, lq, d, dtype=dtype), torch.randn(b, h, lk, d, dtype=dtype),
            torch.randn(b, h, lk, d, dtype=dtype))


# ---------------------------------------------------------------------------- bad input: attention
def test_sdpa_bad_inputs():
    q, k, v = qkv()
    sdpa = fastbert.scaled_dot_product_attention
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        sdpa(q.numpy(), k, v)
    with pytest.raises(ValueError, match="same rank, at least 2"):
        sdpa(q[0], k, v)
    with pytest.raises(ValueError, match="same rank, at least 2"):
        sdpa(q[0, 0, 0], k[0, 0, 0], v[0, 0, 0])
    with pytest.raises(ValueError, match="must agree in the dims before"):
        sdpa(q[None].expand(2, -1, -1, -1, -1), k[None], v[None])
    with pytest.raises(ValueError, match="more dims than query"):
        sdpa(q[0], k[0], v[0], attn_mask=torch.ones(1, 3, 5, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="key must be a floating-point"):
        sdpa(q, k.long(), v)
    with pytest.raises(TypeError, match="value has dtype torch.float16"):
        sdpa(q, k, v.half())
    with pytest.raises(ValueError, match="key head dim"):
        sdpa(q, k[..., :4], v)
    with pytest.raises(ValueError, match="key .* and value"):
        sdpa(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="same batch dim"):
        sdpa(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="enable_gqa=True"):  # fewer K/V heads need the flag
        sdpa(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="divide"):
        sdpa(q, k[:, :2], v[:, :2], enable_gqa=True)
    with pytest.raises(ValueError, match="attn_mask of shape"):
        sdpa(q, k, v, attn_mask=torch.ones(2, 3, 5, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be a bool tensor"):
        sdpa(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.int64))
    with pytest.raises(TypeError, match="attn_mask must be a torch.Tensor"):
        sdpa(q, k, v, attn_mask=[[True]])
    with pytest.raises(ValueError, match="dropout_p must be in"):
        sdpa(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        sdpa(q, k, v, dropout_p=-0.1)
    with pytest.raises(TypeError, match="dropout_p must be a float"):
        sdpa(q, k, v, dropout_p="0.1")
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        sdpa(q, k, v, is_causal=1)
    with pytest.raises(ValueError, match="scale must be a finite positive"):
        sdpa(q, k, v, scale=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        sdpa(q, k, v, backend="cudnn")
    with pytest.raises(TypeError, match="backend must be a str"):
        sdpa(q, k, v, backend=1)


def test_varlen_bad_inputs():
    h, d = 2, 8
    q = torch.randn(10, h, d)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    va = fastbert.varlen_attention
    with pytest.raises(ValueError, match="q must be 3-D"):
        va(q[None], q, q, cu, cu, 6, 6)
    with pytest.raises(TypeError, match="cu_seqlens_q must be an int32"):
        va(q, q, q, cu.float(), cu, 6, 6)
    with pytest.raises(ValueError, match="must start at 0"):
        va(q, q, q, torch.tensor([1, 4, 10], dtype=torch.int32), cu, 6, 6)
    with pytest.raises(ValueError, match="non-decreasing"):
        va(q, q, q, torch.tensor([0, 6, 4, 10], dtype=torch.int32), torch.tensor([0, 2, 4, 10], dtype=torch.int32), 6, 6)
    with pytest.raises(ValueError, match="does not match the packed length"):
        va(q, q, q, torch.tensor([0, 4, 9], dtype=torch.int32), cu, 6, 6)
    with pytest.raises(ValueError, match="same batch"):
        va(q, q, q, cu, torch.tensor([0, 10], dtype=torch.int32), 6, 10)
    with pytest.raises(ValueError, match="max_seqlen_q = 5"):
        va(q, q, q, cu, cu, 5, 6)
    with pytest.raises(TypeError, match="max_seqlen_k must be an int"):
        va(q, q, q, cu, cu, 6, 6.0)
    with pytest.raises(ValueError, match="1-D with batch"):
        va(q, q, q, cu[:1], cu[:1], 6, 6)
    q3 = torch.randn(10, 3, d)  # 3 query heads cannot share 2 key / value heads
    with pytest.raises(ValueError, match="divide"):
        va(q3, q, q, cu, cu, 6, 6)


def test_block_sparse_bad_inputs():
    q, k, v = qkv(lq=40, lk=40)
    layout = torch.ones(3, 3, 3, dtype=torch.bool)
    bsa = fastbert.block_sparse_attention
    with pytest.raises(ValueError, match=r"layout must have shape .* \(3 or 1, 3, 3\)"):
        bsa(q, k, v, layout[:, :2], 16)
    with pytest.raises(ValueError, match="layout must have shape"):
        bsa(q, k, v, torch.ones(2, 3, 3, dtype=torch.bool), 16)
    with pytest.raises(TypeError, match="layout must be a bool"):
        bsa(q, k, v, layout.float(), 16)
    with pytest.raises(ValueError, match="layout must be 3-D"):
        bsa(q, k, v, layout[0], 16)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        bsa(q, k, v, layout, 0)
    with pytest.raises(TypeError, match="block_size must be an int"):
        bsa(q, k, v, layout, 16.0)


def test_linformer_bad_inputs():
    q, k, v = qkv(lk=9)
    e = torch.randn(4, 9)
    la = fastbert.linformer_attention
    with pytest.raises(ValueError, match="proj_k must have shape"):
        la(q, k, v, torch.randn(4, 8), e)
    with pytest.raises(ValueError, match="proj_v must have shape"):
        la(q, k, v, e, torch.randn(2, 4, 9))
    with pytest.raises(ValueError, match="same k"):
        la(q, k, v, e, torch.randn(5, 9))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool"):
        la(q, k, v, e, e, key_padding_mask=torch.zeros(2, 9))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, Lk\)"):
        la(q, k, v, e, e, key_padding_mask=torch.zeros(2, 8, dtype=torch.bool))


def test_norm_and_gelu_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="normalized_shape"):
        fastbert.layer_norm(x, (7,))
    with pytest.raises(TypeError, match="normalized_shape must be an int"):
        fastbert.layer_norm(x, None)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        fastbert.layer_norm(x, 8, torch.ones(7))
    with pytest.raises(TypeError, match="input must be a floating-point"):
        fastbert.layer_norm(x.int(), 8)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        fastbert.layer_norm(x, 8, eps=-1.0)
    with pytest.raises(ValueError, match="residual .* must have the shape"):
        fastbert.add_layer_norm(x, x[:2], None, None)
    with pytest.raises(ValueError, match=r"input_bias must have shape \(8,\)"):
        fastbert.add_layer_norm(x, x, None, None, input_bias=torch.ones(4))
    with pytest.raises(ValueError, match="dropout_p must be in"):
        fastbert.add_layer_norm(x, x, None, None, dropout_p=2.0)
    with pytest.raises(ValueError, match="approximate must be 'none'"):
        fastbert.gelu(x, "erf")
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        fastbert.bias_gelu(x, torch.ones(4))
    with pytest.raises(TypeError, match="residual must be a floating-point"):
        fastbert.add_layer_norm(x, x.int(), None, None)
    assert fastbert.add_layer_norm(x, x.double(), None, None).dtype == torch.float64  # promoted


# ------------------------------------------------------------------------------- empty inputs
def test_sdpa_empty_sequences_return_zeros():
    q, k, v = qkv(lq=3, lk=0)
    out = fastbert.scaled_dot_product_attention(q, k, v)
    assert out.shape == (2, 3, 3, 8) and (out == 0).all()
    q, k, v = qkv(lq=0, lk=4)
    assert fastbert.scaled_dot_product_attention(q, k, v).shape == (2, 3, 0, 8)


# ----------------------------------------------------------------------------------- dispatch
def test_auto_on_cpu_uses_torch_and_matches_reference():
    q, k, v = qkv()
    out = fastbert.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out, fastbert.reference.scaled_dot_product_attention(q, k, v))
    impl = backends.select("layer_norm", "auto", torch.device("cpu"), input=q)
    assert impl.backend == "torch"


def test_explicit_backend_that_cannot_serve_lists_reasons(monkeypatch):
    q, k, v = qkv()
    with pytest.raises(backends.BackendError, match="backend 'cuda'"):
        fastbert.scaled_dot_product_attention(q, k, v, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if "triton" in backends.implementations("layer_norm"):
        with pytest.raises(backends.BackendError, match="TRITON_INTERPRET=1"):
            fastbert.layer_norm(q, 8, backend="triton")


def test_env_var_sets_default_backend(monkeypatch):
    q, k, v = qkv()
    monkeypatch.setenv("FASTBERT_BACKEND", "cuda")
    with pytest.raises(backends.BackendError):
        fastbert.scaled_dot_product_attention(q, k, v)
    monkeypatch.setenv("FASTBERT_BACKEND", "torch")
    fastbert.scaled_dot_product_attention(q, k, v)
    monkeypatch.setenv("FASTBERT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTBERT_BACKEND"):
        fastbert.scaled_dot_product_attention(q, k, v)


def test_op_reasons_are_collected_for_auto():
    calls = []

    def refuse(**call):
        calls.append(call)
        return ["refused for the test"]

    backends.register("_test_op", "torch", reasons=refuse)(lambda: None)
    try:
        with pytest.raises(backends.BackendError) as info:
            backends.select("_test_op", None, torch.device("cpu"), x=1)
        msg = str(info.value)
        assert "torch: refused for the test" in msg and "cuda: not implemented" in msg
        assert calls == [{"x": 1}]
    finally:
        backends._OPS.pop("_test_op")


def test_select_remembers_answers_by_signature(monkeypatch):
    calls = []

    def count(**call):
        calls.append(call)
        return [] if call["x"].dtype != torch.float64 else ["no float64 for the test"]

    backends.register("_test_op", "torch", reasons=count)(lambda: None)
    cpu = torch.device("cpu")
    try:
        x = torch.zeros(4, 6)
        for t in (x, x.clone(), torch.ones(4, 6)):  # same dtype, shape, strides: worked out once
            assert backends.select("_test_op", "torch", cpu, x=t, p=0.5).backend == "torch"
        assert len(calls) == 1
        # another stride, shape, dtype, scalar or requested backend is worked out anew
        backends.select("_test_op", "torch", cpu, x=x.t(), p=0.5)
        backends.select("_test_op", "torch", cpu, x=x[:3], p=0.5)
        backends.select("_test_op", "torch", cpu, x=x.half(), p=0.5)
        backends.select("_test_op", "torch", cpu, x=x, p=0.25)
        backends.select("_test_op", "auto", cpu, x=x, p=0.5)
        assert len(calls) == 6
        # so is a call after the interpreter setting changes or the cache is cleared
        monkeypatch.setenv("TRITON_INTERPRET", "0" if backends.interpreter_enabled() else "1")
        backends.select("_test_op", "torch", cpu, x=x, p=0.5)
        backends.clear_select_cache()
        backends.select("_test_op", "torch", cpu, x=x, p=0.5)
        assert len(calls) == 8
        # a refusal is never remembered: it raises every time
        for _ in range(2):
            with pytest.raises(backends.BackendError, match="no float64 for the test"):
                backends.select("_test_op", "torch", cpu, x=x.double(), p=0.5)
        assert len(calls) == 10
        # lists are compared by value; an unhashable argument is served without being remembered
        backends.select("_test_op", "torch", cpu, x=x, p=[1, 2])
        backends.select("_test_op", "torch", cpu, x=x, p=[1, 2])
        backends.select("_test_op", "torch", cpu, x=x, p={"a": 1})
        backends.select("_test_op", "torch", cpu, x=x, p={"a": 1})
        assert len(calls) == 13
        # a tensor that requires grad, or grad mode off, is another signature (an inference-only
        # kernel refuses a call that needs gradients: a remembered "yes" must not serve it)
        backends.select("_test_op", "torch", cpu, x=x.clone().requires_grad_(), p=0.5)
        with torch.no_grad():
            backends.select("_test_op", "torch", cpu, x=x, p=0.5)
        assert len(calls) == 15
    finally:
        backends._OPS.pop("_test_op")
        backends.clear_select_cache()


def test_registering_an_implementation_forgets_remembered_answers(monkeypatch):
    monkeypatch.setattr(backends, "backend_reasons", lambda *a, **k: [])  # every backend can run
    cpu = torch.device("cpu")
    backends.register("_test_op", "torch", priority=("cuda", "torch"))(lambda: "torch")
    try:
        x = torch.zeros(3)
        assert backends.select("_test_op", "auto", cpu, x=x).backend == "torch"
        backends.register("_test_op", "cuda")(lambda: "cuda")
        assert backends.select("_test_op", "auto", cpu, x=x).backend == "cuda"
    finally:
        backends._OPS.pop("_test_op")
        backends.clear_select_cache()


def test_every_public_op_has_a_torch_implementation():
    for op in ["scaled_dot_product_attention", "varlen_attention", "block_sparse_attention",
               "linformer_attention", "layer_norm", "add_layer_norm", "gelu", "bias_gelu", "geglu"]:
        assert "torch" in backends.implementations(op)
        assert callable(getattr(fastbert, op))


# ------------------------------------------------------------------------------------ padding
def test_unpad_pad_roundtrip_and_varlen_equals_padded():
    b, l, h, d = 3, 9, 2, 8
    mask = torch.ones(b, l, dtype=torch.int64)
    mask[0, 5:] = 0
    mask[2, 1:] = 0
    x = torch.randn(b, l, h, d)
    packed, idx, cu, maxlen = fastbert.unpad_input(x, mask)
    assert packed.shape == (5 + 9 + 1, h, d) and cu.tolist() == [0, 5, 14, 15] and maxlen == 9
    assert cu.dtype == torch.int32 and idx.dtype == torch.int64
    back = fastbert.pad_input(packed, idx, b, l)
    assert torch.equal(back[mask.bool()], x[mask.bool()]) and (back[~mask.bool()] == 0).all()
    # varlen attention on the packed tokens == padded SDPA with a key-padding mask, on real rows
    out = fastbert.varlen_attention(packed, packed, packed, cu, cu, maxlen, maxlen)
    xt = x.transpose(1, 2)
    want = fastbert.scaled_dot_product_attention(xt, xt, xt, attn_mask=mask.bool()[:, None, None, :])
    got = fastbert.pad_input(out, idx, b, l).transpose(1, 2)
    keep = mask.bool()[:, None, :, None].expand_as(want)
    assert torch.allclose(got[keep], want[keep], atol=1e-6)


def test_unpad_bad_inputs():
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="attention_mask must be"):
        fastbert.unpad_input(x, torch.ones(2, 4, 1))
    with pytest.raises(ValueError, match="must start with the"):
        fastbert.unpad_input(x, torch.ones(2, 5))
    with pytest.raises(TypeError, match="attention_mask must be bool or integer"):
        fastbert.unpad_input(x, torch.ones(2, 4))
    with pytest.raises(ValueError, match="indices must be 1-D"):
        fastbert.pad_input(x[0], torch.arange(3), 2, 4)
    # a position one past the last slot (batch * seqlen) is out of range
    with pytest.raises(ValueError, match=r"positions in \[0, batch \* seqlen\) = \[0, 8\)"):
        fastbert.pad_input(x[0, :2], torch.tensor([0, 8]), 2, 4)


def test_unpad_integer_mask_values_are_real_or_not():
    """An integer mask is nonzero = real token: a 2 counts once, as a 1 does."""
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    want = fastbert.unpad_input(x, mask)
    got = fastbert.unpad_input(x, mask * 2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    assert got[3] == want[3] == 5


def test_known_broken_interpreter_combination_is_refused_with_a_reason(monkeypatch):
    import numpy
    import triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    reasons = backends.backend_reasons("triton", torch.device("cpu"))
    assert any("numpy<2.4 or triton>=3.7" in r for r in reasons)
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    assert backends.backend_reasons("triton", torch.device("cpu")) == []


def test_cu_seqlens_values_read_once_until_modified():
    """The host check of cu_seqlens is remembered for the same unmodified tensor (one device sync
    per model forward instead of one per layer), and forgotten after an in-place change."""
    from fastbert import _validation as v

    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    first = v.check_cu_seqlens("cu_seqlens_q", cu, 10, cu.device)
    assert first == [0, 4, 10]
    assert v.check_cu_seqlens("cu_seqlens_q", cu, 10, cu.device) is first  # not read again
    with pytest.raises(ValueError, match="does not match the packed length 11"):
        v.check_cu_seqlens("cu_seqlens_q", cu, 11, cu.device)  # other total: checked afresh
    cu[1] = 11  # in-place write: the version counter moves, the values are read again
    with pytest.raises(ValueError, match="non-decreasing"):
        v.check_cu_seqlens("cu_seqlens_q", cu, 10, cu.device)
    view = cu[:]  # a view shares the version counter
    cu.copy_(torch.tensor([0, 5, 10], dtype=torch.int32))
    assert v.check_cu_seqlens("cu_seqlens_q", cu, 10, cu.device) == [0, 5, 10]
    view[1] = 12
    with pytest.raises(ValueError, match="non-decreasing"):
        v.check_cu_seqlens("cu_seqlens_q", cu, 10, cu.device)
    # an inference tensor (no version counter) is remembered by reference, pointer and length
    with torch.inference_mode():
        inf = torch.tensor([0, 3, 10], dtype=torch.int32)
        assert inf.is_inference()
        first = v.check_cu_seqlens("cu_seqlens_q", inf, 10, inf.device)
        assert v.check_cu_seqlens("cu_seqlens_q", inf, 10, inf.device) is first
    assert v.check_cu_seqlens("cu_seqlens_q", inf, 10, inf.device) is first
    # the cache stays small
    keep = [torch.tensor([0, i], dtype=torch.int32) for i in range(3 * v._CU_CHECKED_MAX)]
    for t in keep:
        v.check_cu_seqlens("cu", t, int(t[1]), t.device)
    assert len(v._CU_CHECKED) <= v._CU_CHECKED_MAX


def test_dropout_one_drops_everything_as_torch():
    """p = 1 is allowed, as in torch (a config may say so): attention outputs are 0 with zero
    gradients, add_layer_norm normalises the residual alone, the modules take dropout=1.0. The
    kernels' 1 / (1 - p) scale does not allow it: "auto" runs the torch backend, an explicit one
    says why it cannot."""
    from fastbert.backends import BackendError
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, requires_grad=True) for _ in range(3))
    out = fastbert.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, dropout_p=1.0))
    assert all((g == 0).all() for g in torch.autograd.grad(out.sum(), [q, k, v]))
    with pytest.raises(BackendError, match="dropout_p = 1"):
        fastbert.scaled_dot_product_attention(q, k, v, dropout_p=1.0, backend="triton")
    packed = q.detach()[0].transpose(0, 1)  # (5, 3, 8): one sequence
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    assert (fastbert.varlen_attention(packed, packed, packed, cu, cu, 3, 3, dropout_p=1.0) == 0).all()
    layout = torch.ones(1, 1, 1, dtype=torch.bool)
    assert (fastbert.block_sparse_attention(q, k, v, layout, 16, dropout_p=1.0) == 0).all()
    proj = torch.randn(4, 5)
    assert (fastbert.linformer_attention(q, k, v, proj, proj, dropout_p=1.0) == 0).all()
    x, res, w, b = torch.randn(4, 8), torch.randn(4, 8), torch.rand(8), torch.randn(8)
    torch.testing.assert_close(fastbert.add_layer_norm(x, res, w, b, input_bias=b, dropout_p=1.0),
                               F.layer_norm(res, (8,), w, b))
    theirs = torch.nn.MultiheadAttention(8, 2, dropout=1.0, batch_first=True)
    ours = fastbert.nn.MultiheadAttention.from_torch(copy.deepcopy(theirs)).train()
    x = torch.randn(2, 4, 8)
    torch.testing.assert_close(ours(x, x, x)[0], theirs.train()(x, x, x)[0])
    layer = fastbert.nn.TransformerEncoderLayer(8, 2, 16, dropout=1.0, batch_first=True).train()
    assert layer(x).shape == x.shape


def test_readme_signatures_match_the_functions():
    """The README's API table writes each public function's signature out; it must be the real
    one (names, order, defaults, keyword-only marker), less the ``backend`` every op takes."""
    import inspect
    import re
    from pathlib import Path

    def norm(s):  # 1e-5 and 1e-05 are one default, as are "none" and 'none'
        s = s.replace('"', "'")
        return re.sub(r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?(?![\w.])", lambda m: repr(float(m[0])), s)

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    found = 0
    for cell in re.findall(r"^\| (`\w+\(.*?) \|", text, flags=re.M):  # a row's first cell
        for one in re.findall(r"`(\w+\(.*?\))`", cell):
            name = one.split("(", 1)[0]
            fn = getattr(fastbert, name, None)
            if fn is None or not callable(fn):
                continue
            real = inspect.signature(fn)
            params = [p.replace(annotation=inspect.Parameter.empty)
                      for n, p in real.parameters.items() if n != "backend"]
            want = f"{name}{real.replace(parameters=params, return_annotation=inspect.Signature.empty)}"
            assert norm(one) == norm(want), f"README: {one}\ncode:   {want}"
            found += 1
    assert found >= 10  # every row of the table was read


@pytest.mark.parametrize("check", ["mask_reads_allowed", "host_checks_allowed"])
def test_host_read_gates_trace_in_one_graph_for_cuda_devices(check, monkeypatch):
    """The gates that decide whether a mask's values may be read on the host ask whether
    torch.compile is tracing before asking CUDA whether a graph is being captured: Dynamo cannot
    trace torch.cuda.is_current_stream_capturing() ("torch.* op returned non-Tensor"), so a
    one-graph compile of a padding-free model failed for a CUDA mask (CPU ones never asked). No
    GPU here: CUDA's answer outside a capture (False) is stood in for."""
    import torch._dynamo
    import torch.cuda.graphs

    from fastbert import _validation
    monkeypatch.setattr(torch.cuda.graphs, "_cuda_isCurrentStreamCapturing", lambda: False)
    gate = getattr(_validation, check)
    device = torch.device("cuda", 0)
    assert gate(device)  # eager, outside a capture: reads allowed
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            f = torch.compile(lambda x: x + 1 if gate(device) else x - 1, fullgraph=True,
                              backend="eager")
            assert f(torch.zeros(1)).item() == -1  # tracing one graph: no host reads
    finally:
        torch._dynamo.reset()


def test_dropout_seeds_take_63_bits_and_every_kernel_keys_on_all_of_them():
    """Two calls that draw the same seed drop the same elements (the counter is the element
    index), so seeds take 63 bits: below 2**31 they repeated about once in 46k calls with dropout,
    a few times in any long training run, and across ops (attention and add+LayerNorm share the
    random function). Every Triton kernel family keys Philox with the whole seed: seeds that
    differ only above bit 31 give other masks."""
    from fastbert._rng import dropout_seed
    from fastbert.kernels.attention import attention_dropout_mask
    from fastbert.kernels.block_sparse_attention import block_sparse_attention_dropout_mask
    from fastbert.kernels.layer_norm import dropout_keep_mask
    from fastbert.testing import DEVICE

    device = torch.device(DEVICE)
    seeds = torch.cat([dropout_seed(0.1, device) for _ in range(64)])
    assert seeds.dtype == torch.int64 and bool((seeds >= 0).all())
    assert int(seeds.max()) >= 2 ** 40  # 64 draws below 2**40 of 2**63: p = 2**-1472
    low = torch.tensor([123456789], dtype=torch.int64, device=device)
    high = low + (1 << 40)
    for name, mask in (
            ("attention", lambda s: attention_dropout_mask(s, 0.5, (1, 2, 16, 16))),
            ("block_sparse", lambda s: block_sparse_attention_dropout_mask(s, (1, 2, 16, 16), 0.5)),
            ("add_layer_norm", lambda s: dropout_keep_mask(s, (16, 32), 0.5))):
        assert not torch.equal(mask(low), mask(high)), name
