"""Shared fixtures: random-weight checkpoints, built once per test run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.checkpoints import SPECS, Spec, build_checkpoint

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session", params=SPECS, ids=[spec.name for spec in SPECS])
def checkpoint(request: pytest.FixtureRequest, checkpoint_root: Path) -> tuple[Spec, Path]:
    spec: Spec = request.param
    path = checkpoint_root / spec.name
    if not path.exists():
        build_checkpoint(spec, path)
    return spec, path


@pytest.fixture(scope="session")
def small_checkpoint(checkpoint_root: Path) -> Path:
    """The first spec's checkpoint, for tests that need one model rather than the matrix."""
    spec = SPECS[0]
    path = checkpoint_root / spec.name
    if not path.exists():
        build_checkpoint(spec, path)
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests skip cleanly where CUDA is absent (CI never has it)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
