"""Shared fixtures: synthetic audio and a pinned thread count so timings and results are stable on 2 cores."""
from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


def make_wav(num_samples: int, seed: int = 0, sr: int = 16000) -> np.ndarray:
    """A voiced-speech-like signal: a few harmonics with a wandering pitch plus a little noise, float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / sr
    f0 = 120 + 40 * np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * t + rng.uniform(0, 6.28))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    sig = sum(np.sin(k * phase) / k for k in range(1, 6))
    env = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 5) * t) ** 2
    wav = 0.3 * sig * env + 0.01 * rng.standard_normal(num_samples)
    return (wav / max(1e-6, np.abs(wav).max()) * 0.5).astype(np.float32)


@pytest.fixture
def synthetic_wav():
    """Factory: ``synthetic_wav(num_samples, seed=0)`` -> float32 numpy array."""
    return make_wav


@pytest.fixture
def one_torch_thread():
    """Pin torch to one thread for a test: tiny models are dominated by per-op overhead, where a second OpenMP
    thread only adds waits (and on a busy 2-core machine it waits for a core). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
