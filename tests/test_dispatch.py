"""Measured dispatch (fastbert.dispatch, backends.auto_order, bench/make_dispatch_table.py).

No GPU is needed: tables are built from synthetic benchmark rows, and the selection test points a
made-up op at a "cuda" device with the device-level checks patched out.
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fastbert import backends, dispatch
from fastbert.benchmarks import attention as bench_attention
from fastbert.benchmarks import norms as bench_norms
from fastbert.benchmarks.common import dtype_name

ROOT = Path(__file__).resolve().parents[1]


def _row(op, case, backend, p50, params, dtype="fp16", pass_="fwd", ours=True, status="ok",
         variant=None):
    return {"op": op, "case": case, "pass": pass_, "dtype": dtype, "impl": f"fastbert-{backend}",
            "ours": ours, "backend": backend, "variant": variant, "status": status,
            "p50_ms": p50, "params": params}


def _run(rows, capability="9.0"):
    return {"run_id": "x", "env": {"capability": capability, "gpu": "NVIDIA H100"}, "rows": rows}


LN768 = {"rows": 16384, "N": 768}
LN4096 = {"rows": 16384, "N": 4096}


# ----------------------------------------------------------------------------------------------
# Shape classes: the call side and the benchmark side must agree, or a measurement never applies
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lq,d,causal,pad,dtype", [
    (17, 40, False, True, torch.float16), (97, 80, True, False, torch.float32),
    (130, 160, False, False, torch.float16)], ids=lambda v: str(v))
def test_attention_class_matches_benchmark_case(lq, d, causal, pad, dtype):
    case = bench_attention.dense_case(2, 2, lq, d, dtype, causal=causal, key_padding=pad)
    s = case.setup("cpu")
    q, k, _ = bench_attention.bhld(s)
    call = dict(query=q, key=k, value=k, attn_mask=s.mask, dropout_p=0.0, is_causal=causal,
                scale=None)
    from_call = dispatch.shape_class("scaled_dot_product_attention", **call)
    assert from_call == dispatch.bench_shape_class(case.op, dtype_name(dtype), case.params)
    assert from_call.startswith(dtype_name(dtype) + "/")
    assert ("/mask/" in from_call) == pad and from_call.endswith("causal" if causal else "full")


@pytest.mark.parametrize("window,kv_heads", [((4, 4), None), (None, 1), ((2, 0), 1)], ids=str)
def test_window_and_gqa_cases_have_classes_of_their_own(window, kv_heads):
    """A sliding-window or grouped-query benchmark case must not rank the backends for plain dense
    calls (the backends handle those differently); call and benchmark sides still agree."""
    case = bench_attention.dense_case(2, 2, 33, 64, torch.float16, window=window, kv_heads=kv_heads)
    s = case.setup("cpu")
    q, k, _ = bench_attention.bhld(s)
    from_call = dispatch.shape_class("scaled_dot_product_attention", query=q, key=k, value=k,
                                     attn_mask=None, is_causal=False, window_size=window)
    assert from_call == dispatch.bench_shape_class(case.op, "fp16", case.params)
    assert from_call.endswith("/window" * (window is not None) + "/gqa" * (kv_heads is not None))


@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm", "gelu", "bias_gelu", "geglu"])
@pytest.mark.parametrize("cols", [1, 768, 1000, 4097])
def test_row_class_matches_benchmark_case(op, cols):
    case = bench_norms.norm_case(op, cols, torch.bfloat16, rows=3)
    s = case.setup("cpu")
    x = s.x  # geglu's is packed: (3, 2 * cols), classed by its output width cols
    from_call = dispatch.shape_class(op, input=x, gate=None)
    assert from_call == dispatch.bench_shape_class(op, "bf16", case.params)
    expected = "N<=1024" if cols <= 1024 else "N<=4096" if cols <= 4096 else "N>4096"
    assert from_call == f"bf16/{expected}"
    del s


def test_mixed_precision_add_layer_norm_has_its_own_class():
    """A bf16 input with an fp32 residual (autocast's layer) is measured and dispatched apart from
    the all-bf16 op: a different kernel pair (the CUDA backend casts first)."""
    case = bench_norms.norm_case("add_layer_norm", 768, torch.bfloat16, rows=3,
                                 residual_dtype=torch.float32)
    x, r = torch.empty(3, 768, dtype=torch.bfloat16), torch.empty(3, 768)
    from_call = dispatch.shape_class("add_layer_norm", input=x, residual=r)
    assert from_call == "bf16+fp32/N<=1024"
    assert from_call == dispatch.bench_shape_class(case.op, case.dtype_label, case.params)
    assert dispatch.shape_class("add_layer_norm", input=x, residual=x) == "bf16/N<=1024"


def test_unmeasured_op_has_no_class():
    assert dispatch.shape_class("block_sparse_attention", query=None) is None
    assert dispatch.bench_shape_class("layer_norm", "fp16", {"rows": 4}) is None  # no "N"


# ----------------------------------------------------------------------------------------------
# Building tables
# ----------------------------------------------------------------------------------------------
def test_build_orders_by_geometric_mean_per_class():
    rows = [_row("layer_norm", "a", "triton", 0.020, LN768), _row("layer_norm", "a", "cuda", 0.010, LN768),
            _row("layer_norm", "b", "triton", 0.010, LN768), _row("layer_norm", "b", "cuda", 0.015, LN768),
            _row("layer_norm", "c", "triton", 0.050, LN4096), _row("layer_norm", "c", "cuda", 0.080, LN4096),
            # peers and failed / variant rows never count
            _row("layer_norm", "a", None, 0.001, LN768, ours=False),
            _row("layer_norm", "c", "cuda", 0.001, LN4096, status="wrong"),
            _row("layer_norm", "c", "cuda", 0.001, LN4096, variant="dense")]
    table = dispatch.build_table([_run(rows)], sources=["r.json"])
    classes = table["archs"]["sm90"]["layer_norm"]
    # class N<=1024: geomean triton sqrt(0.02*0.01)=0.01414 vs cuda sqrt(0.01*0.015)=0.01225
    assert classes["fp16/N<=1024"]["order"] == ["cuda", "triton"]
    assert classes["fp16/N<=1024"]["cases"] == 2
    assert classes["fp16/N<=1024"]["ms"]["cuda"] == pytest.approx((0.010 * 0.015) ** 0.5, rel=1e-4)
    assert classes["fp16/N<=4096"]["order"] == ["triton", "cuda"]
    assert table["sources"] == ["r.json"] and table["format"] == dispatch.FORMAT


def test_build_tie_keeps_default_order_and_needs_two_backends():
    rows = [_row("gelu", "a", "cuda", 0.0100, LN768), _row("gelu", "a", "triton", 0.0102, LN768),
            _row("gelu", "b", "triton", 0.010, LN4096)]  # one backend only: no entry
    table = dispatch.build_table([_run(rows)])
    assert table["archs"]["sm90"]["gelu"] == {
        "fp16/N<=1024": {"order": ["triton", "cuda"], "ms": {"cuda": 0.01, "triton": 0.0102},
                         "cases": 1}}


def test_build_uses_only_complete_cases_and_later_runs():
    first = [_row("layer_norm", "a", "triton", 0.010, LN768), _row("layer_norm", "a", "cuda", 0.020, LN768)]
    later = [_row("layer_norm", "a", "triton", 0.030, LN768), _row("layer_norm", "a", "cuda", 0.020, LN768),
             _row("layer_norm", "b", "triton", 0.001, LN768)]  # b lacks cuda: not compared
    table = dispatch.build_table([_run(first), _run(later)])
    entry = table["archs"]["sm90"]["layer_norm"]["fp16/N<=1024"]
    assert entry["order"] == ["cuda", "triton"] and entry["cases"] == 1
    # runs on another architecture are kept apart; runs without a capability are ignored
    table = dispatch.build_table([_run(first, "8.0"), _run(later, ""), _run(later)])
    assert table["archs"]["sm80"]["layer_norm"]["fp16/N<=1024"]["order"] == ["triton", "cuda"]
    assert table["archs"]["sm90"]["layer_norm"]["fp16/N<=1024"]["order"] == ["cuda", "triton"]


# ----------------------------------------------------------------------------------------------
# Loading, the environment variable, and selection
# ----------------------------------------------------------------------------------------------
def _write(tmp_path, table, name="table.json"):
    path = tmp_path / name
    path.write_text(json.dumps(table))
    return path


@pytest.mark.parametrize("content,match", [
    ("{", "not valid JSON"),
    ('{"format": "other"}', "is not a fastbert-dispatch/1 table"),
    ('{"format": "fastbert-dispatch/1", "archs": []}', "'archs' must be an object"),
    ('{"format": "fastbert-dispatch/1", "archs": {"sm90": {"gelu": {"fp16/N<=1024": '
     '{"order": ["torch"]}}}}}', "needs an 'order'"),
])
def test_load_table_rejects_bad_files(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        dispatch.load_table(path)
    assert "bad.json" in str(e.value)
    with pytest.raises(ValueError, match="does not exist"):
        dispatch.load_table(tmp_path / "missing.json")


@pytest.fixture
def table_env(monkeypatch):
    """Set FASTBERT_DISPATCH_TABLE for one test and reload; restores the active table after."""
    def use(path):
        monkeypatch.setenv(dispatch.TABLE_ENV, str(path))
        dispatch.reset_cache()
    yield use
    monkeypatch.delenv(dispatch.TABLE_ENV, raising=False)
    dispatch.reset_cache()


@pytest.fixture
def fake_op(monkeypatch):
    """layer_norm's registry entry swapped (for this test only) for three made-up backends that
    can all serve any call, on a pretend CUDA device of capability 9.0. (The op name decides the
    shape class, so the stand-in keeps layer_norm's name.)"""
    name = "layer_norm"
    fake = backends._Op(name, priority=("triton", "cuda", "torch"))
    for b in backends.BACKENDS:
        fake.impls[b] = backends.Implementation(name, b, lambda *a, _b=b: _b, lambda **c: [])
    monkeypatch.setitem(backends._OPS, name, fake)
    monkeypatch.setattr(backends, "backend_reasons", lambda *a, **k: [])
    monkeypatch.setattr(dispatch, "arch_of", lambda device: "sm90" if device.type == "cuda" else None)
    yield name


def test_auto_follows_the_measured_order(tmp_path, table_env, fake_op):
    rows = [_row("layer_norm", "a", "triton", 0.02, LN768), _row("layer_norm", "a", "cuda", 0.01, LN768)]
    table_env(_write(tmp_path, dispatch.build_table([_run(rows)])))
    cuda = torch.device("cuda")
    narrow, wide = torch.empty(4, 768, dtype=torch.float16), torch.empty(4, 8192, dtype=torch.float16)
    assert backends.select(fake_op, "auto", cuda, input=narrow).backend == "cuda"
    assert backends.auto_order(fake_op, cuda, {"input": narrow}) == ("cuda", "triton", "torch")
    # other classes, dtypes and devices keep the default order; an explicit backend is obeyed
    assert backends.select(fake_op, "auto", cuda, input=wide).backend == "triton"
    assert backends.select(fake_op, "auto", cuda, input=narrow.float()).backend == "triton"
    assert backends.select(fake_op, "auto", torch.device("cpu"), input=narrow).backend == "triton"
    assert backends.select(fake_op, "triton", cuda, input=narrow).backend == "triton"


def test_measured_backend_that_cannot_serve_is_skipped(tmp_path, table_env, fake_op):
    rows = [_row("layer_norm", "a", "triton", 0.02, LN768), _row("layer_norm", "a", "cuda", 0.01, LN768)]
    table_env(_write(tmp_path, dispatch.build_table([_run(rows)])))
    backends._OPS[fake_op].impls["cuda"].reasons = lambda **c: ["no"]
    x = torch.empty(4, 768, dtype=torch.float16)
    assert backends.select(fake_op, "auto", torch.device("cuda"), input=x).backend == "triton"


def test_bad_table_in_environment_raises_on_lookup(tmp_path, table_env, fake_op):
    table_env(tmp_path / "nope.json")
    x = torch.empty(4, 768, dtype=torch.float16)
    with pytest.raises(ValueError, match="FASTBERT_DISPATCH_TABLE: dispatch table .*nope.json "
                                         "does not exist"):
        backends.select(fake_op, "auto", torch.device("cuda"), input=x)
    # CPU calls never consult the table, so they keep working
    assert backends.select(fake_op, "auto", torch.device("cpu"), input=x).backend == "triton"


def test_no_table_means_default_order(monkeypatch, table_env):
    monkeypatch.setattr(dispatch, "SHIPPED_TABLE", Path("/nonexistent/dispatch_table.json"))
    monkeypatch.delenv(dispatch.TABLE_ENV, raising=False)
    dispatch.reset_cache()
    assert dispatch.active_table() == (None, {"format": dispatch.FORMAT, "sources": [], "archs": {}})


def test_shipped_table_if_present_is_valid():
    if dispatch.SHIPPED_TABLE.exists():
        dispatch.load_table(dispatch.SHIPPED_TABLE)
    else:
        pytest.skip("no measured table shipped yet (no GPU results under bench/results/)")


# ----------------------------------------------------------------------------------------------
# bench/make_dispatch_table.py
# ----------------------------------------------------------------------------------------------
def _script():
    spec = importlib.util.spec_from_file_location("make_dispatch_table",
                                                  ROOT / "bench" / "make_dispatch_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_make_dispatch_table_script(tmp_path, capsys):
    from fastbert.benchmarks import report

    rows = [_row("layer_norm", "a", "triton", 0.02, LN768), _row("layer_norm", "a", "cuda", 0.01, LN768)]
    report.write_json(tmp_path / "run", _run(rows))
    out = tmp_path / "table.json"
    mod = _script()
    assert mod.main(["--results", str(tmp_path / "run" / "results.json"), "--out", str(out)]) == 0
    table = dispatch.load_table(out)
    assert table["archs"]["sm90"]["layer_norm"]["fp16/N<=1024"]["order"] == ["cuda", "triton"]
    assert "cuda > triton" in capsys.readouterr().out
    # nothing to read: a clear message and a non-zero exit, no file
    empty = tmp_path / "empty"
    empty.mkdir()
    assert mod.main(["--results", str(empty / "results.json"), "--out", str(tmp_path / "t2.json")]) == 2
    assert not (tmp_path / "t2.json").exists()


def test_fastbert_dispatch_cli(tmp_path, capsys):
    from fastbert import cli
    from fastbert.benchmarks import report

    rows = [_row("gelu", "a", "triton", 0.02, LN4096), _row("gelu", "a", "cuda", 0.01, LN4096)]
    report.write_json(tmp_path / "run", _run(rows))
    out = tmp_path / "t.json"
    assert cli.main(["dispatch", str(tmp_path / "run" / "results.json"), "--out", str(out)]) == 0
    assert dispatch.load_table(out)["archs"]["sm90"]["gelu"]["fp16/N<=4096"]["order"] == ["cuda", "triton"]
    assert f"{dispatch.TABLE_ENV}={out}" in capsys.readouterr().out
    assert cli.main(["dispatch", str(tmp_path / "nope.json"), "--out", str(out)]) == 2
    assert "cannot build the table" in capsys.readouterr().err


def test_class_names_are_the_documented_ones():
    """The class strings themselves, at the documented edges (head dim <=64, <=128, >128; key
    length <=512, >512; row width <=1024, <=4096, >4096): a table written by one fastbert is read
    by another, so moving an edge must show here (the call and benchmark sides move together, so
    comparing them with each other cannot see it)."""
    def attn(d, lk, **kw):
        q = torch.empty(1, 2, 3, d, dtype=torch.float16)
        k = torch.empty(1, 2, lk, d, dtype=torch.float16)
        return dispatch.shape_class("scaled_dot_product_attention", query=q, key=k, value=k, **kw)

    assert attn(64, 512) == "fp16/D<=64/Lk<=512/nomask/full"
    assert attn(65, 513) == "fp16/D<=128/Lk>512/nomask/full"
    assert attn(128, 1024) == "fp16/D<=128/Lk>512/nomask/full"
    assert attn(129, 4096, attn_mask=torch.ones(3, 4096, dtype=torch.bool), is_causal=True) == \
        "fp16/D>128/Lk>512/mask/causal"
    # the docstring's example, from the benchmark side
    assert dispatch.bench_shape_class("scaled_dot_product_attention", "fp16",
                                      {"D": 64, "Lk": 512, "mask": "key_padding"}) == \
        "fp16/D<=64/Lk<=512/mask/full"
    assert dispatch.bench_shape_class("scaled_dot_product_attention", "bf16",
                                      {"D": 80, "Lk": 1024, "H": 2}) == "bf16/D<=128/Lk>512/nomask/full"
    for n, cls in ((1024, "N<=1024"), (1025, "N<=4096"), (4096, "N<=4096"), (4097, "N>4096")):
        assert dispatch.shape_class("layer_norm", input=torch.empty(2, n)) == f"fp32/{cls}"


def test_reloading_the_table_changes_auto(tmp_path, table_env, fake_op):
    """select remembers its answers, but under the table's generation: after
    FASTBERT_DISPATCH_TABLE is pointed at another table (and reloaded), the same call follows the
    new measurements instead of the remembered order."""
    cuda = torch.device("cuda")
    x = torch.empty(4, 768, dtype=torch.float16)
    first = [_row("layer_norm", "a", "triton", 0.02, LN768), _row("layer_norm", "a", "cuda", 0.01, LN768)]
    table_env(_write(tmp_path, dispatch.build_table([_run(first)]), "first.json"))
    assert backends.select(fake_op, "auto", cuda, input=x).backend == "cuda"
    assert backends.select(fake_op, "auto", cuda, input=x).backend == "cuda"  # remembered
    second = [_row("layer_norm", "a", "triton", 0.01, LN768), _row("layer_norm", "a", "cuda", 0.02, LN768)]
    table_env(_write(tmp_path, dispatch.build_table([_run(second)]), "second.json"))
    assert backends.select(fake_op, "auto", cuda, input=x).backend == "triton"


@pytest.mark.parametrize("given,want", [("Triton", "triton"), ("CUDA", "cuda"), ("Torch", "torch"),
                                        ("AUTO", "auto"), ("auto", "auto")])
def test_backend_names_are_case_insensitive(monkeypatch, given, want):
    """Backend names are normalised to lower case, from the argument and from FASTBERT_BACKEND
    alike (as they have been since the first release; an unknown name is still refused with every
    valid one listed, a non-string with a TypeError)."""
    assert backends.resolve(given) == want
    monkeypatch.setenv("FASTBERT_BACKEND", given)
    assert backends.resolve(None) == want
    x = torch.randn(3, 8)
    if want in ("torch", "auto"):
        assert backends.select("gelu", given, torch.device("cpu"), input=x,
                               approximate="none").backend == "torch"
    monkeypatch.setenv("FASTBERT_BACKEND", "Bogus")
    with pytest.raises(ValueError, match="FASTBERT_BACKEND environment variable must be one of "
                                         "'auto', 'cuda', 'triton', 'torch'"):
        backends.resolve(None)
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.resolve(given + "x")
    with pytest.raises(TypeError, match="backend must be a str"):
        backends.resolve(1)


@pytest.mark.parametrize("value", [None, "", "0", "false", "False", "FALSE", "off", "no", "2", " 1",
                                   "1", "true", "True", "ON", "yes", "y"])
def test_interpreter_setting_values(monkeypatch, value):
    """TRITON_INTERPRET is read as Triton reads it (1, true, on, yes or y in any case; anything
    else, unset included, is off): fastbert taking "off", "no" or "2" for on made "auto" pass
    Triton over on a GPU while Triton itself ran compiled."""
    from triton import knobs

    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    assert backends.interpreter_enabled() is bool(knobs.runtime.interpret)
    assert backends.interpreter_enabled() is (value in ("1", "true", "True", "ON", "yes", "y"))


def test_explain_with_a_call_answers_for_an_explicit_request(monkeypatch):
    """explain(op, device, **call) says why each backend cannot serve the call when it is asked
    for by name: under the interpreter, Triton on CPU tensors can (only "auto" passes it over, for
    being slow), so its list is empty, and an explicit select agrees with it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    if backends.backend_reasons("triton", cpu):
        pytest.skip("Triton's interpreter cannot run here: "
                    + "; ".join(backends.backend_reasons("triton", cpu)))
    x = torch.randn(4, 8)
    why = backends.explain("gelu", cpu, input=x, approximate="none")
    assert why["triton"] == [] and why["torch"] == []
    assert backends.select("gelu", "triton", cpu, input=x, approximate="none").backend == "triton"
    assert backends.select("gelu", "auto", cpu, input=x, approximate="none").backend == "torch"
    # a call Triton cannot serve: its op-level reason is listed
    why = backends.explain("gelu", cpu, input=x.double(), approximate="none")
    assert any("float64" in r for r in why["triton"]) and why["torch"] == []
