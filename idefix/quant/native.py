"""idefix's optional native kernel: Q8_0 matrix-vector products on AVX-512 CPUs (idefix/quant/q8_0.c).

setup.py builds it into _native/ beside this file when it can; it is a plain shared library (no Python module),
loaded with ctypes once PyTorch is imported, so that its OpenMP loops run on PyTorch's own thread pool. Absent,
unloadable or on a CPU without AVX-512, `q8_0_available()` is False and the PyTorch kernels serve.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
from collections.abc import Callable
from pathlib import Path

import torch

Q8_0_MAX_ROWS = 16  # beyond this many rows a matmul on the dequantized weight is faster (compute-bound)


def _load_q8_0() -> Callable[..., None] | None:
    folder = Path(__file__).resolve().parent / "_native"  # where setup.py builds it
    paths = [folder / f"q8_0{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    path = next((p for p in paths if p.exists()), None)
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    if not lib.idefix_q8_0_supported():
        return None
    fn = lib.idefix_q8_0_matmul
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ctypes.c_int]
    fn.restype = None
    return fn


_Q8_0 = _load_q8_0()
_threads = torch.get_num_threads


def q8_0_available() -> bool:
    return _Q8_0 is not None


def q8_0_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x fp32 [M, K] @ (q int8 [N, K] * scale fp32 [N, K / 32] per 32-block).T -> fp32 [M, N]; all contiguous."""
    if _Q8_0 is None:
        raise RuntimeError("the native Q8_0 kernel is not available (see q8_0_available())")
    y = x.new_empty(x.shape[0], q.shape[0])
    _Q8_0(x.data_ptr(), x.shape[0], x.shape[1], q.data_ptr(), scale.data_ptr(), q.shape[0], y.data_ptr(), _threads())
    return y
