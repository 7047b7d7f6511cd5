"""What the figures were measured on, and the page cache warmed so every engine loads from memory."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def warm_page_cache(path: Path, chunk: int = 64 * 2**20) -> None:
    """Read every weight file once, so no engine pays (or is spared) the disk reads the others were."""
    for file in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.uqff")):
        with file.open("rb") as handle:
            while handle.read(chunk):
                pass
