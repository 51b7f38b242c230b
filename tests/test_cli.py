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
