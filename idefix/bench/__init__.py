"""`idefix bench`: idefix measured side by side with its peers and against the machine's limits.

    from idefix.bench import BenchOptions, run_bench
    result = run_bench(BenchOptions(random_shape="smolvlm-256m", compare=("transformers",)))

See benchmarks/README.md for what is measured and how to reproduce the published tables.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BenchOptions", "run_bench"]


def __getattr__(name: str) -> Any:
    # Lazy: `idefix --help` builds the bench parser without importing torch.
    if name == "BenchOptions":
        from idefix.bench.options import BenchOptions

        return BenchOptions
    if name == "run_bench":
        from idefix.bench.run import run_bench

        return run_bench
    raise AttributeError(name)
