"""Benchmarks: BERT-base inference latency and training step: HuggingFace eager/sdpa, torch.compile,
fastbert.optimize and the padding-free BertEncoder; fp16 models, and fp32 models trained under
autocast to bf16 (mixed precision).

Two ways to run them (both need a CUDA GPU):

    python bench/bench_bert.py [--quick] [--out DIR] ...     # = fastbert bench --op bert ...
    pytest bench/bench_bert.py --benchmark-json=out.json    # pytest-benchmark (quick selection;
                                                            # FASTBERT_BENCH_FULL=1 for all cases)

The cases themselves live in fastbert.benchmarks.bert (installed with fastbert).
"""
import sys

import pytest
import torch

from fastbert.benchmarks.pytest_support import NEEDS_GPU, benchmark_params, run_benchmark

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed")
FAMILY = "bert"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_GPU)


@pytest.mark.parametrize("case, impl", benchmark_params(FAMILY))
def test_bert(benchmark, case, impl):
    run_benchmark(benchmark, case, impl)


if __name__ == "__main__":
    from fastbert.benchmarks.runner import main

    sys.exit(main(sys.argv[1:], default_ops=[FAMILY]))
