import sys

from idefix.bench.cli import run

sys.exit(run())
