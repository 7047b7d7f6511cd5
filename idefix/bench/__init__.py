"""`idefix bench`: idefix measured side by side with its peers and against the machine's limits.

    from idefix.bench import BenchOptions, run_bench
    result = run_bench(BenchOptions(random_shape="smolvlm-256m", compare=("transformers",)))

See benchmarks/README.md for what is measured and how to reproduce the published tables.
"""

from __future__ import annotations

from idefix.bench.options import BenchOptions
from idefix.bench.run import run_bench

__all__ = ["BenchOptions", "run_bench"]
