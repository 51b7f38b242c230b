"""The `fastbert` command line (run as `python -m fastbert` in a subprocess, as a user would)."""
import os
import subprocess
import sys

import pytest

from fastbert import check


def run_cli(*args, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "fastbert", *args], capture_output=True, text=True,
                          env=e, timeout=600)


def test_info_lists_versions_and_every_op():
    res = run_cli("info")
    assert res.returncode == 0, res.stderr
    for word in ("fastbert", "torch", "triton", "fastbert._C"):
        assert word in res.stdout
    for op in check.CASES:
        assert op in res.stdout
    assert "torch   available" in res.stdout


def test_info_into_a_closed_pipe_exits_without_a_traceback():
    # as `fastbert info | head -1`: the reader is gone before info writes (it imports torch first)
    proc = subprocess.Popen([sys.executable, "-m", "fastbert", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1 and "Traceback" not in err, err


def test_check_runs_the_table_and_passes():
    """As a user runs it: without TRITON_INTERPRET in the environment (on a machine without a GPU
    check turns the interpreter on itself, which must happen before triton is imported)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "fastbert", "check", "--op", "gelu", "--op", "layer_norm"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert any(l.startswith("gelu") and "reference" in l and "pass" in l for l in lines)
    assert any(l.startswith("layer_norm") and " torch " in l and "pass" in l for l in lines)
    assert "0 failed" in res.stdout


def test_check_on_cuda_without_a_gpu_is_refused():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    res = run_cli("check", "--device", "cuda", "--op", "gelu")
    assert res.returncode == 2 and "no CUDA GPU is visible" in res.stderr and "FAIL" not in res.stdout


def test_check_unknown_op_is_an_error():
    res = run_cli("check", "--op", "softmax")
    assert res.returncode == 2 and "unknown op" in res.stderr


def test_check_reports_a_broken_backend(monkeypatch):
    # A backend that returns a wrong answer must make `check` fail (exit 1) rather than pass.
    from fastbert import backends

    impl = backends.implementations("gelu")["torch"]
    monkeypatch.setattr(impl, "fn", lambda x, approximate: x * 0.5)
    assert check.main(["gelu"], "cpu") == 1


@pytest.mark.parametrize("argv", [[], ["frobnicate"]])
def test_usage_errors(argv):
    res = run_cli(*argv)
    assert res.returncode == 2


@pytest.mark.parametrize("option,value", [("--rep-ms", "nan"), ("--rep-ms", "0"),
                                          ("--warmup-ms", "inf"), ("--warmup-ms", "-1"),
                                          ("--budget-s", "-5"), ("--budget-s", "ten")])
def test_bench_timing_options_must_be_finite_positive_numbers(option, value):
    # checked before anything runs (a NaN --rep-ms once failed every case at the timing stage and
    # was reported as fastbert results that failed)
    res = run_cli("bench", option, value, "--list")
    assert res.returncode == 2 and option in res.stderr and repr(value) in res.stderr
    assert "Traceback" not in res.stderr


def test_check_counts_a_declined_call_as_skipped_not_passed(monkeypatch, capsys):
    from fastbert import backends

    def decline(op, backend, dtype, device):
        raise backends.BackendError(f"{backend} declines")

    monkeypatch.setattr(check, "check_op", decline)
    assert check.main(["gelu"], "cpu") == 0
    out = capsys.readouterr().out
    assert "0 passed, 0 failed" in out and "skipped" in out and "skip" in out
    assert "not checked here: backend cuda" in out  # what the plan left out, and why


def test_dispatch_errors_name_the_file_and_exit_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    res = run_cli("dispatch", str(bad), "--out", str(tmp_path / "t.json"))
    assert res.returncode == 2 and str(bad) in res.stderr and "Traceback" not in res.stderr


def test_info_warns_of_a_bad_backend_variable():
    res = run_cli("info", env={"FASTBERT_BACKEND": "bogus"})
    assert res.returncode == 0 and "FASTBERT_BACKEND" in res.stderr and "bogus" in res.stderr


def test_info_counts_the_dispatch_table_classes(tmp_path, monkeypatch, capsys):
    """`fastbert info` summarises the active dispatch table per architecture: shape classes summed
    over the ops (3 here: 2 for layer_norm, 1 for gelu), then the number of ops."""
    import json

    from fastbert import cli, dispatch

    entry = {"order": ["cuda", "triton"], "ms": {"cuda": 0.01, "triton": 0.02}, "cases": 1}
    table = {"format": dispatch.FORMAT, "sources": [],
             "archs": {"sm90": {"layer_norm": {"fp16/N<=1024": entry, "fp16/N<=4096": entry},
                                "gelu": {"bf16/N>4096": entry}},
                       "sm80": {"gelu": {"fp16/N<=1024": entry}}}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(dispatch.TABLE_ENV, str(path))
    dispatch.reset_cache()
    try:
        assert cli.main(["info"]) == 0
    finally:
        monkeypatch.delenv(dispatch.TABLE_ENV)
        dispatch.reset_cache()
    out = capsys.readouterr().out
    assert (f"dispatch table: {path} (sm80: 1 shape classes over 1 ops; "
            "sm90: 3 shape classes over 2 ops)") in out


def test_reference_row_for_every_op():
    """`fastbert check` has a reference row (float64, against independent torch computations) for
    every op it checks, and each passes: the independent computations (e.g. varlen's own window
    and causal masks) must agree with fastbert.reference to 1e-10."""
    import torch

    rows = check.plan("cpu")
    for op in check.CASES:
        assert (op, "reference", torch.float64) in rows, op
        ok, ratio, note = check.check_op(op, "reference", torch.float64, "cpu")
        assert ok and ratio <= 1, (op, ratio)
        assert note == "float64 vs torch, allowed 1e-10"


@pytest.mark.parametrize("device", ["cuda", "cuda:0"], ids=["plain", "indexed"])
def test_check_plan_takes_bfloat16_on_any_cuda_device_name(device, monkeypatch):
    """`fastbert check` on a GPU adds bfloat16 rows for "cuda:0" as for "cuda" (a string compare
    skipped them for an indexed device). No GPU here: every backend is said to be usable."""
    import torch

    from fastbert import backends
    monkeypatch.setattr(backends, "backend_reasons", lambda b, dev: [])
    rows = check.plan(device)
    assert any(b == "triton" and dt == torch.bfloat16 for _, b, dt in rows), rows


def test_reference_row_tolerance_is_1e_10(monkeypatch):
    """A reference that is off by 1e-6 (far below any low-precision tolerance) fails its row: the
    reference is checked in float64 against torch to 1e-10."""
    import torch
    import torch.nn.functional as F

    from fastbert import reference

    def off(x, approximate="none", **kw):
        return F.gelu(x, approximate=approximate) * (1 + 1e-6)

    assert check.check_op("gelu", "reference", torch.float64, "cpu")[0]
    monkeypatch.setattr(reference, "gelu", off)
    ok, ratio, _ = check.check_op("gelu", "reference", torch.float64, "cpu")
    assert not ok and ratio > 100


def test_check_op_fails_on_a_wrong_gradient(monkeypatch):
    """A backend whose output is right but whose gradient is wrong fails its row: every
    comparison (output, each gradient, the inference output) must pass, the last one must not
    decide alone."""
    import torch
    import torch.nn.functional as F

    def wrong_gradient(x, approximate="none", backend=None):  # gelu's value, d/dx = 2
        return F.gelu(x.detach(), approximate=approximate) + 2 * (x - x.detach())

    assert check.check_op("gelu", "torch", torch.float32, "cpu")[0]
    monkeypatch.setattr(check, "_public", lambda op: wrong_gradient)
    ok, ratio, _ = check.check_op("gelu", "torch", torch.float32, "cpu")
    assert not ok and ratio > 1
