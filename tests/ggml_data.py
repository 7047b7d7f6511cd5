"""Test tensors for the GGML codecs, shared by tests/unit/test_ggml.py and tests/slow/test_ggml_llamacpp.py.

`portable_weights` is bit-identical on every machine and library version (integer hashing + exact float
arithmetic), so hashes of quantized bytes can be pinned in the fast suite and checked against llama.cpp in the
slow one.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(i: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = i * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E019)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def portable_weights(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """[rows, cols] float32, bell-shaped (sum of 4 exact uniforms, std ~0.02), 1 in 97 values x20, odd rows."""
    n = rows * cols
    idx = np.arange(4 * n, dtype=np.uint64) + np.uint64(seed) * np.uint64(1 << 40)
    u = (_splitmix64(idx) >> np.uint64(40)).astype(np.float64) / float(1 << 24)  # exact 24-bit uniforms
    x = (u.reshape(4, n).sum(0) - 2.0) * 0.0346  # Irwin-Hall(4): variance 1/3
    x[::97] *= 20.0
    w = torch.from_numpy(x.astype(np.float32).reshape(rows, cols))
    w[1] = 0.0  # an all-zero row
    w[2] = 0.0
    w[2, 5] = 0.5  # a single nonzero
    w[3] = w[3].abs() + 0.01  # all positive
    w[4, : cols // 2] = 0.0  # zero blocks next to normal ones
    w[5] *= 1e-6  # tiny values (fp16 subnormal scales)
    return w


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]
