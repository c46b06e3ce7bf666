"""Reading rows of a feature matrix X [N, D] for k-means: a numpy array, a numpy memmap on disk, or a torch tensor
on any device. Rows are read only when asked for and come back as float32 tensors on the compute device."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch import Tensor

__all__ = ["num_rows", "check_rows", "read_rows", "take_rows", "rows_at", "iter_chunks"]


def num_rows(X) -> int:
    return int(X.shape[0])


def check_rows(X, dim: int | None = None):
    """X as a 2-D numpy array or tensor (other sequences are converted); ``dim``: the feature count it must have."""
    if not isinstance(X, (np.ndarray, Tensor)):
        X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D [N, D], got shape {tuple(X.shape)}")
    if dim is not None and X.shape[1] != dim:
        raise ValueError(f"X has {X.shape[1]} features but the model was fitted on {dim}")
    return X


def read_rows(X, start: int, stop: int, device) -> Tensor:
    """Rows [start, stop) of X as float32 on ``device`` (numpy/memmap rows are read only now)."""
    if isinstance(X, Tensor):
        x = X[start:stop]
    else:
        a = np.ascontiguousarray(X[start:stop], dtype=np.float32)
        x = torch.from_numpy(a if a.flags.writeable else a.copy())  # read-only memmap rows
    return x.to(device=device, dtype=torch.float32, non_blocking=True)


def take_rows(X, idx: np.ndarray, device) -> Tensor:
    """Rows ``idx`` of X (read in sorted order, so the result is sorted too) as float32 on ``device``."""
    idx = np.sort(idx)
    if isinstance(X, Tensor):
        x = X[torch.as_tensor(idx, device=X.device)]
    else:
        x = torch.from_numpy(np.ascontiguousarray(X[idx], dtype=np.float32))
    return x.to(device=device, dtype=torch.float32)


def rows_at(X, start: int, idx: Tensor, device) -> Tensor:
    """Rows ``start + idx`` of X as float32 on ``device``."""
    if isinstance(X, Tensor):
        return X[start + idx.to(X.device)].to(device=device, dtype=torch.float32)
    a = np.asarray(X[start + idx.cpu().numpy()], dtype=np.float32)
    return torch.from_numpy(a).to(device)


def iter_chunks(X, chunk_size: int, device) -> Iterator[tuple[int, Tensor]]:
    """(first row, rows [chunk_size, D] float32 on ``device``) for consecutive chunks of X."""
    n = num_rows(X)
    for s in range(0, n, chunk_size):
        yield s, read_rows(X, s, min(n, s + chunk_size), device)
