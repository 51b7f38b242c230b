"""The benchmark cases and runner behind ``fastbert bench`` (installed code; ``bench/`` drives it).

Modules: :mod:`.runner` (the command: arguments, running cases, output), :mod:`.common` (cases,
implementations, work formulas, checks), :mod:`.timing` (CUDA events, L2 flush, CUDA graphs),
:mod:`.ceilings` (device copy bandwidth and matmul rate), :mod:`.report` (environment, JSON/CSV,
table, plots, Markdown), and one module of cases per op family: :mod:`.attention`,
:mod:`.sparse`, :mod:`.norms`, :mod:`.bert`.
"""
__all__ = ["FAMILIES", "add_arguments", "run"]


def __getattr__(name):
    # the runner is imported on first use, not here: `python -m fastbert.benchmarks.runner` would
    # otherwise find it imported already (runpy's RuntimeWarning)
    if name in __all__:
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
