"""What `pip install` ships: every subpackage, and (in the source distribution) every file the CUDA
build needs. A missing header only shows when someone builds from the sdist, so it is checked here."""
import ast
import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_kwarg(name):
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            for kw in node.keywords:
                if kw.arg == name:
                    return ast.literal_eval(kw.value)
    raise AssertionError(f"setup() has no {name}=")


def test_every_subpackage_is_installed():
    packages = set(_setup_kwarg("packages"))
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "fastbert").rglob("__init__.py")}
    assert on_disk <= packages, f"not in setup.py packages: {sorted(on_disk - packages)}"
    assert "fastbert.kernels" in packages and _setup_kwarg("package_dir")["fastbert.kernels"] == "kernels"


def _left_out(folder, rules):
    """Files under ``folder`` that no ``recursive-include folder <patterns>`` rule covers."""
    patterns = [pat for rule in rules if rule[:2] == ["recursive-include", folder] for pat in rule[2:]]
    files = [p for p in (ROOT / folder).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    assert files, f"{folder}/ is empty"
    return [str(p.relative_to(ROOT)) for p in files if not any(fnmatch.fnmatch(p.name, pat) for pat in patterns)]


def test_sdist_manifest_covers_the_cuda_sources_and_tests():
    """The sdist carries every csrc/ file (the build needs them all) and every tests/ file (the
    CUDA emulator's headers and runtime source included: its tests compile them)."""
    rules = [line.split() for line in (ROOT / "MANIFEST.in").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    for folder in ("csrc", "tests"):
        missing = _left_out(folder, rules)
        assert not missing, f"{folder} files the sdist would leave out (add them to MANIFEST.in): {missing}"


def test_license_is_shipped():
    assert (ROOT / "LICENSE").is_file() and "BSD 3-Clause" in (ROOT / "LICENSE").read_text()
    assert _setup_kwarg("license_files") == ["LICENSE"]
    assert "LICENSE" in (ROOT / "MANIFEST.in").read_text().split()


def test_a_checkout_imported_directly_finds_its_kernels():
    """With the checkout on sys.path and no installer's mapping (python -S: no .pth, so no editable
    finder), fastbert.kernels is the checkout's kernels/ (it used to be missing: a non-editable
    install run from the checkout imported the source fastbert/ without its kernels)."""
    import os
    import subprocess
    import sys

    import torch

    site = str(Path(torch.__file__).resolve().parents[1])
    code = ("import fastbert, fastbert.kernels.layer_norm as m; "
            "print(m.__file__); print(fastbert.kernels.__name__)")
    res = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         timeout=600, cwd=str(ROOT),
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), site])))
    assert res.returncode == 0, res.stderr[-2000:]
    path, name = res.stdout.split()
    assert Path(path) == ROOT / "kernels" / "layer_norm.py" and name == "fastbert.kernels"


def test_a_second_checkout_uses_its_own_kernels(tmp_path):
    """A checkout imported while another checkout's editable install is active (it maps
    fastbert.kernels to its own kernels/) still runs its own kernels, not the other's."""
    import os
    import shutil
    import subprocess
    import sys

    other = tmp_path / "other"
    (other / "fastbert").mkdir(parents=True)
    shutil.copy(ROOT / "setup.py", other / "setup.py")
    for f in (ROOT / "fastbert").glob("*.py"):
        shutil.copy(f, other / "fastbert" / f.name)
    for sub in ("ops", "nn", "models", "integrations", "benchmarks"):
        shutil.copytree(ROOT / "fastbert" / sub, other / "fastbert" / sub,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "kernels", other / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    code = "import fastbert.kernels.gelu as m; print(m.__file__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=str(other), env=dict(os.environ, PYTHONPATH=str(other)))
    assert res.returncode == 0, res.stderr[-2000:]
    assert Path(res.stdout.strip()).resolve() == (other / "kernels" / "gelu.py").resolve()


def test_bench_commit_of_an_installed_copy_is_unknown(monkeypatch):
    """report.git_commit() asks git only in fastbert's own checkout: an installed copy (in some
    site-packages, maybe inside another repository) records "unknown", not that repository's HEAD."""
    import fastbert
    from fastbert.benchmarks import report

    assert fastbert._checkout_root == str(ROOT.resolve())  # this checkout is recognised
    monkeypatch.delenv("FASTBERT_COMMIT", raising=False)
    monkeypatch.setattr(fastbert, "_checkout_root", None)  # as for an installed copy
    assert report.git_commit() == ("unknown", "none")
