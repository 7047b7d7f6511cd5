"""The runtime never imports transformers (it is the test-time oracle only)."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys, importlib, pkgutil
import idefix
for module in pkgutil.walk_packages(idefix.__path__, "idefix."):
    if module.name.endswith("__main__"):
        continue  # running it would start a command
    importlib.import_module(module.name)
bad = sorted(name for name in sys.modules if name == "transformers" or name.startswith("transformers."))
print(",".join(bad))
"""


def test_importing_every_runtime_module_loads_no_transformers() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout
