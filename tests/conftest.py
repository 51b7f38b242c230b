"""Test configuration.

Without a visible GPU the Triton kernels run under Triton's CPU interpreter; that switch must be
made before triton (or fastbert.kernels) is imported, hence at the top of this file.

torch.compile's on-disk caches go to a fresh directory per test session (unless
TORCHINDUCTOR_CACHE_DIR is set): a cache left by an earlier checkout can replay a backward graph
compiled against an older signature of one of our custom ops and fail (or pass) for the wrong
reason. That directory is removed when the session ends.
"""
import atexit
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastbert-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def _shard(config, items):
    """FASTBERT_TEST_SHARD=i/n keeps shard i of n (bench/gpu_run.sh runs the shards in parallel
    processes on the GPU machine): the tests of one function stay together, functions are balanced
    by test count (a test marked ``shard_weight(n)`` counts n times: e.g. a fuzz test, whose every
    example compiles kernels), and `bigmem` tests are left to a serial run (`-m bigmem`)."""
    spec = os.environ.get("FASTBERT_TEST_SHARD")
    if not spec:
        return items
    from fastbert.testing import parse_shard, shard_group, shard_groups, shard_sizes

    index, n = parse_shard(spec)
    owner = shard_groups(shard_sizes(items), n)
    keep = [it for it in items if "bigmem" not in it.keywords and owner[shard_group(it)] == index]
    kept = set(id(it) for it in keep)
    dropped = [it for it in items if id(it) not in kept]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    return keep


def _background_key(item):
    mark = item.get_closest_marker("background")
    return mark.args[0] if mark is not None else None


def pytest_collection_modifyitems(config, items):
    items[:] = _shard(config, items)
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
    # tests that wait for a child started in the background go last (tests/_background.py)
    items.sort(key=lambda it: _background_key(it) is not None)


def pytest_collection_finish(session):
    """Start the background children of the selected tests (see tests/_background.py)."""
    if session.config.option.collectonly:
        return
    import _background

    keys = [_background_key(it) for it in session.items
            if _background_key(it) is not None and "cuda" not in it.keywords]
    _background.start(keys)


def pytest_sessionfinish(session):
    import _background

    _background.stop()


def _poisoned(fn):
    def wrapper(*args, **kwargs):
        t = fn(*args, **kwargs)
        if t.is_floating_point():
            with torch.no_grad():  # torch.empty(..., requires_grad=True) gives a leaf
                t.fill_(float("nan"))
        return t

    return wrapper


@pytest.fixture(autouse=True)
def nan_poison(monkeypatch):
    """Fill every fresh torch.empty* allocation with NaN, so a kernel that leaves part of its
    output unwritten fails its comparison instead of passing on lucky zeros."""
    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, _poisoned(getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoned(torch.Tensor.new_empty))
    yield


@pytest.fixture(autouse=True)
def fresh_select_cache():
    """Tests monkeypatch what backends report (availability, versions, registered ops); select's
    remembered answers from an earlier test must not outlive that."""
    from fastbert import backends

    backends.clear_select_cache()
    yield
    backends.clear_select_cache()


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Fresh random inputs every run; a failing test's report shows the seed
    (rerun with FASTBERT_TEST_SEED=<seed> to reproduce it)."""
    seed = int(os.environ.get("FASTBERT_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    request.node._fastbert_seed = seed
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "_fastbert_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("fastbert", f"FASTBERT_TEST_SEED={seed}"))
