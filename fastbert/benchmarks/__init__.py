"""The benchmark cases and runner behind ``fastbert bench`` (installed code; ``bench/`` drives it).

Modules: :mod:`.runner` (the command: arguments, running cases, output), :mod:`.common` (cases,
implementations, work formulas, checks), :mod:`.timing` (CUDA events, L2 flush, CUDA graphs),
:mod:`.ceilings` (device copy bandwidth and matmul rate), :mod:`.report` (environment, JSON/CSV,
table, plots, Markdown), and one module of cases per op family: :mod:`.attention`,
:mod:`.sparse`, :mod:`.norms`, :mod:`.bert`.
"""
from .runner import FAMILIES, add_arguments, run

__all__ = ["FAMILIES", "add_arguments", "run"]
