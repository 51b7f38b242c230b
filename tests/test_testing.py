"""fastbert.testing's own helpers: the shard assignment behind bench/gpu_run.sh's parallel test
run, checked as a pure function and through pytest's collection."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import torch

from fastbert.testing import check_close, max_err, parse_shard, rand, shard_groups, shard_sizes

ROOT = Path(__file__).resolve().parents[1]


def test_parse_shard():
    assert parse_shard("2/5") == (2, 5)
    for bad in ("2", "a/b", "5/5", "-1/3", "1/0", None):
        with pytest.raises(ValueError, match="FASTBERT_TEST_SHARD"):
            parse_shard(bad)


def test_shard_groups_balances_and_keeps_groups_whole():
    sizes = {"a": 10, "b": 7, "c": 5, "d": 5, "e": 1}
    owner = shard_groups(sizes, 2)
    assert set(owner) == set(sizes)
    load = [sum(n for g, n in sizes.items() if owner[g] == s) for s in range(2)]
    assert sum(load) == 28 and max(load) - min(load) <= 2  # greedy: a=10,d=5 | b=7,c=5,e=1
    assert shard_groups(sizes, 2) == owner  # deterministic
    assert set(shard_groups(sizes, 1).values()) == {0}
    assert shard_groups({}, 3) == {}


class _Item:
    """The parts of a collected pytest item that shard_sizes reads."""

    def __init__(self, nodeid, weight=None, bigmem=False):
        self.nodeid = nodeid
        self.keywords = {"bigmem": True} if bigmem else {}
        self._marker = None if weight is None else pytest.mark.shard_weight(weight).mark

    def get_closest_marker(self, name):
        return self._marker if name == "shard_weight" else None


def test_shard_sizes_counts_weights_and_leaves_bigmem_out():
    items = [_Item("t.py::test_a[1]"), _Item("t.py::test_a[2]"), _Item("t.py::test_fuzz[x]", 48),
             _Item("t.py::test_fuzz[y]", 48), _Item("t.py::test_big[1]", bigmem=True),
             _Item("u.py::test_a")]
    assert shard_sizes(items) == {"t.py::test_a": 2, "t.py::test_fuzz": 96, "u.py::test_a": 1}
    # two heavy fuzz tests and many light ones: the fuzz test gets a shard to itself
    items += [_Item(f"v.py::test_{i}") for i in range(90)]
    owner = shard_groups(shard_sizes(items), 2)
    assert {g for g, s in owner.items() if s == owner["t.py::test_fuzz"]} == {"t.py::test_fuzz"}


def _collect(shard=None):
    env = dict(os.environ)
    env.pop("FASTBERT_TEST_SHARD", None)
    if shard:
        env["FASTBERT_TEST_SHARD"] = shard
    out = subprocess.run([sys.executable, "-m", "pytest", "tests/test_sparsity.py",
                          "tests/test_dispatch.py", "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return [line for line in out.stdout.splitlines() if "::" in line]


def test_shards_partition_the_collected_tests():
    everything = _collect()
    shards = [_collect(f"{i}/3") for i in range(3)]
    union = [t for s in shards for t in s]
    assert sorted(union) == sorted(everything)  # disjoint and complete (no bigmem tests here)
    assert all(shards)
    for s in shards:  # a function's parametrizations stay in one shard
        funcs = {t.split("[")[0] for t in s}
        for other in shards:
            if other is not s:
                assert not funcs & {t.split("[")[0] for t in other}


def test_check_close_allows_one_ulp_of_the_output_dtype_and_no_more():
    # a float16 mask gradient summed over many rows (a fuzz example): exact value 10.5377, whose
    # nearest float16 10.5391 the low-precision run gets; the kernel's float32 sum lay a hair past
    # the midpoint and rounded to the other neighbour, 10.5312 (one ulp, 0.0078, from the first)
    ref = torch.tensor([10.537733991614346, -10.537733991614342], dtype=torch.float64)
    low = torch.tensor([10.5390625, -10.5390625], dtype=torch.float16)
    ok, err, allowed = check_close(torch.tensor([10.5390625, -10.53125], dtype=torch.float16), ref, low)
    assert ok and math.isclose(err, 10.537733991614342 - 10.53125)
    two_ulps = torch.tensor([10.5390625, -10.5234375], dtype=torch.float16)
    assert not check_close(two_ulps, ref, low)[0]
    # elementwise: a small element does not get the ulp of the largest one
    ref2 = torch.tensor([10.5, 0.1], dtype=torch.float64)
    low2 = ref2.half()
    assert check_close(torch.tensor([10.5078125, 0.1], dtype=torch.float16), ref2, low2)[0]
    assert not check_close(torch.tensor([10.5, 0.1 + 0.006], dtype=torch.float16), ref2, low2)[0]
    # non-finite values: NaN never passes, matching infinities do, and no element hides another
    inf = torch.tensor([float("inf"), 1.0])
    assert check_close(inf, inf.double(), inf)[0]
    assert not check_close(torch.tensor([float("inf"), float("nan")]), inf.double(), inf)[0]
    assert not check_close(torch.tensor([0.0, 5.0]), torch.zeros(2, dtype=torch.float64), atol=0.0)[0]
    # where the fp64 reference itself is NaN (torch's fully masked rows), the low-precision run's
    # error (then inf) alone sets the bound, as before the ulp; without one, a NaN never passes
    nan_ref = torch.tensor([float("nan"), 1.0], dtype=torch.float64)
    assert check_close(torch.tensor([0.0, 1.0]), nan_ref, nan_ref.float())[0]
    assert not check_close(torch.tensor([0.0, 1.0]), nan_ref)[0]


def test_max_err_never_broadcasts_and_matches_infinities():
    out, ref = torch.zeros(4, 1), torch.zeros(4, 8)
    with pytest.raises(ValueError, match="shapes differ"):
        check_close(out, ref)  # a wrongly shaped output that broadcasts used to pass
    inf = torch.tensor([1.0, float("inf"), -float("inf")])
    assert max_err(inf, inf.clone()) == 0.0
    assert max_err(inf, torch.tensor([1.0, float("inf"), 0.0])) == float("inf")
    assert max_err(torch.tensor([float("nan")]), torch.tensor([float("nan")])) == float("inf")
    with pytest.raises(ValueError, match="0-d"):
        rand((), noncontiguous=True)


def test_background_jobs_run_skip_and_time_out(monkeypatch):
    """tests/_background.py: jobs started together run one after another off the main thread; a
    test gets its child's output, a skip for a builder's reason, a failure for a child killed at
    its time limit or a builder that raised; a job never started runs when its test asks."""
    import _background as bg

    monkeypatch.delenv(bg.ENV, raising=False)
    env, cwd = dict(os.environ), str(ROOT)
    py = sys.executable
    bg.register("selftest-ok", lambda: bg.Job([py, "-c", "print('ran')"], env, cwd, 120))
    bg.register("selftest-slow", lambda: bg.Job([py, "-c", "import time; time.sleep(60)"], env, cwd, 1))
    bg.register("selftest-skip", lambda: "nothing to check here")
    bg.register("selftest-raises", lambda: 1 / 0)
    bg.register("selftest-later", lambda: bg.Job([py, "-c", "import sys; sys.exit(3)"], env, cwd, 120))
    bg.start(["selftest-ok", "selftest-slow", "selftest-skip", "selftest-raises"])
    done = bg.result("selftest-ok")
    assert done.returncode == 0 and done.stdout.strip() == "ran"
    with pytest.raises(pytest.fail.Exception, match="ran past its 1 s limit"):
        bg.result("selftest-slow")
    with pytest.raises(pytest.skip.Exception, match="nothing to check here"):
        bg.result("selftest-skip")
    with pytest.raises(pytest.fail.Exception, match="ZeroDivisionError"):
        bg.result("selftest-raises")
    assert bg.result("selftest-later").returncode == 3  # not started: run in the foreground
