"""Shared fixtures: tiny models in our own checkpoint format."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import ucgm_convert as uc

TINY_SAMPLING = {
    "steps": 3, "order": 1, "stochasticity": 0.0, "extrapolation": 0.0,
    "time_dist": [1.0, 1.0, 1.0], "gaps": [0.001, 0.001], "cfg_scale": 1.0, "cfg_interval": [0.0, 1.0],
}


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch single-threaded inside the block and restore the caller's setting after: CPU round-off
    depends on the thread count, and the tensors in tests are tiny (threads only add synchronisation)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One test single-threaded (`pytestmark = pytest.mark.usefixtures("one_thread")` for a whole module)."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """A whole module single-threaded, its module-scoped fixtures included."""
    with single_thread():
        yield


def tiny_model(seed: int = 0, sampling: dict | None = None) -> uc.GenerativeModel:
    """A 2-block SiT on 3x8x8 pixels with 5 classes and random (non-zero) weights."""
    config = uc.ModelConfig(
        family="ucgm", arch="sit",
        arch_kwargs=dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                         num_classes=5),
        transport="Linear", num_classes=5, latent_shape=(3, 8, 8), recipe=None,
        sampling=dict(TINY_SAMPLING if sampling is None else sampling),
    )
    torch.manual_seed(seed)
    model = uc.GenerativeModel.build(config)
    with torch.no_grad():
        for p in model.net.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A tiny model saved in our format, with sampling defaults in config.json."""
    return uc.save_checkpoint(tiny_model(), tmp_path / "tiny")


def sigkill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float) -> None:
    """kill -9 `proc` as soon as `ready()` holds, and check it died of that signal (not on its own)."""
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if ready():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == -signal.SIGKILL, proc.stderr.read().decode()[-2000:] if proc.stderr else code
