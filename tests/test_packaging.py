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
