"""pytest configuration for bench/: collect the bench_*.py files (pytest's default pattern only
collects test_*.py), so that `pytest bench/ --benchmark-...` runs them all."""
import pytest


def pytest_collect_file(file_path, parent):
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
