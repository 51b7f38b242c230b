"""Child-process tests that run in the background while the rest of the suite runs.

A few tests rerun whole test files in a child process (the CUDA emulator under AddressSanitizer,
the attention suites with a GPU's tiles): minutes each, on one core, while the suite's own process
uses about one core of the machine too. A test marked ``@pytest.mark.background("key")`` gets its
child from a job registered under that key with :func:`register`. As soon as collection ends,
``tests/conftest.py`` starts the jobs of the selected tests, one after another on a worker thread,
and moves those tests to the end of the run; each test then waits for its child with
:func:`result` and checks what it did. A job that was not started (its test run on its own, or
with ``FASTBERT_BACKGROUND=0``) runs when its test asks for it. The checks are the same either
way; only the wall time changes.

A job's builder returns a :class:`Job` (the command to run), or a string: the reason the test is
skipped here (no such toolchain, nothing to check on this machine).
"""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import pytest

ENV = "FASTBERT_BACKGROUND"  # "0": run each job in the foreground, when its test asks


@dataclass
class Job:
    argv: List[str]
    env: Dict[str, str]
    cwd: str
    timeout_s: float
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fastbert-bg-")))


@dataclass
class Finished:
    job: Job
    returncode: Optional[int]  # None: killed at its timeout
    stdout: str
    stderr: str
    seconds: float


_builders: Dict[str, Callable[[], Union[Job, str]]] = {}
_jobs: Dict[str, Union[Job, str]] = {}
_done: Dict[str, Finished] = {}
_errors: Dict[str, str] = {}
_events: Dict[str, threading.Event] = {}
_lock = threading.Lock()
_running: List[subprocess.Popen] = []
_stopping = threading.Event()


def register(key: str, builder: Callable[[], Union[Job, str]]) -> None:
    """Register the job of the tests marked ``background(key)`` (called at a test module's import)."""
    _builders[key] = builder


def _build(key: str) -> Union[Job, str]:
    if key not in _jobs:
        if key not in _builders:
            raise KeyError(f"no background job registered under {key!r}")
        _jobs[key] = _builders[key]()
    return _jobs[key]


def _run(key: str) -> None:
    job = _build(key)
    if isinstance(job, str):
        return
    out, err = job.workdir / "stdout", job.workdir / "stderr"
    start = time.monotonic()
    with open(out, "w") as fo, open(err, "w") as fe:
        with _lock:  # no child starts once stop() has looked
            if _stopping.is_set():
                return
            proc = subprocess.Popen(job.argv, env=job.env, cwd=job.cwd, stdout=fo, stderr=fe,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            _running.append(proc)
        try:
            code = proc.wait(timeout=job.timeout_s)
        except subprocess.TimeoutExpired:
            _kill(proc)
            code = None
        finally:
            with _lock:
                _running.remove(proc)
    _done[key] = Finished(job, code, out.read_text(errors="replace"),
                          err.read_text(errors="replace"), time.monotonic() - start)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)  # the child and whatever it started (compilers, its own children)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def start(keys: List[str]) -> None:
    """Run the jobs of ``keys`` (in that order) one after another on a worker thread."""
    if os.environ.get(ENV, "1") == "0":
        return
    keys = [k for k in dict.fromkeys(keys) if k not in _events]
    for k in keys:
        _events[k] = threading.Event()

    def work():
        for k in keys:
            try:
                _run(k)
            except Exception as e:  # reported (a failure) by the test that waits for it
                _errors[k] = f"{type(e).__name__}: {e}"
            finally:
                _events[k].set()

    if keys:
        atexit.register(stop)
        threading.Thread(target=work, name="fastbert-background-tests", daemon=True).start()


def stop() -> None:
    """Kill the running child, start no other, and remove the jobs' folders (the session is
    ending)."""
    with _lock:
        _stopping.set()
        procs = list(_running)
    for p in procs:
        _kill(p)
    for job in _jobs.values():
        if isinstance(job, Job):
            shutil.rmtree(job.workdir, ignore_errors=True)


def result(key: str) -> Finished:
    """The finished child of ``key``: waited for if started in the background, else run now.
    Skips the test when the job's builder gave a reason."""
    if key in _events:
        _events[key].wait()
    elif key not in _done:
        _run(key)
    if key in _errors:
        pytest.fail(f"the background job {key!r} could not run: {_errors[key]}")
    job = _build(key)
    if isinstance(job, str):
        pytest.skip(job)
    if key not in _done:
        pytest.fail(f"the background job {key!r} did not run (the session was stopping)")
    done = _done[key]
    if done.returncode is None:
        pytest.fail(f"{key}: the child ran past its {job.timeout_s:.0f} s limit and was killed:\n"
                    f"{done.stdout[-4000:]}\n{done.stderr[-2000:]}")
    return done
