"""Toy model and resumable loader for the trainer tests (no speech, no Lhotse: tiny and fast)."""
from __future__ import annotations

import random

import torch
from torch import nn

from speechssl.train.contract import StepOutput


class ToyDataset(torch.utils.data.Dataset):
    """Item lists -> batch dicts; deterministic (x from a fixed seed, y a noisy linear function of x)."""

    def __init__(self, n: int = 96, dim: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        w = torch.randn(dim, 1, generator=g)
        self.y = self.x @ w + 0.1 * torch.randn(n, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, idx: list[int]) -> dict:
        idx = list(idx)
        return {"x": self.x[idx], "y": self.y[idx], "audio_lens": torch.full((len(idx),), 16000)}


class ToyBatchSampler:
    """Variable-size batches of a shuffled epoch; rank r of W keeps batches r, r+W, ...; ``merge`` > 1 instead
    concatenates ``merge`` consecutive batches (the single-process equivalent of ``merge`` ranks)."""

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1, merge: int = 1):
        self.n, self.seed, self.rank, self.world_size, self.merge = n, seed, rank, world_size, merge
        self.epoch = 0
        self.skip = 0

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        order = list(range(self.n))
        rng.shuffle(order)
        out, i = [], 0
        while i < self.n:
            b = rng.choice([3, 5, 7])
            out.append(order[i:i + b])
            i += b
        k = max(self.world_size, self.merge)
        out = out[: len(out) // k * k]  # equal counts on every rank
        if self.merge > 1:
            return [sum(out[j:j + self.merge], []) for j in range(0, len(out), self.merge)]
        return out[self.rank::self.world_size]

    def __iter__(self):
        # no reset of skip here: DataLoader may call iter() on its sampler twice per pass
        return iter(self.batches()[self.skip:])


class ToyLoader:
    """A ResumableLoader-like wrapper over a torch DataLoader with workers: counts consumed batches."""

    def __init__(self, num_workers: int = 0, seed: int = 0, merge: int = 1, n: int = 96):
        import torch.distributed as dist

        rank, ws = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
            else (0, 1)
        self.dataset = ToyDataset(n=n)
        self.sampler = ToyBatchSampler(len(self.dataset), seed, rank, ws, merge)
        self.num_workers = num_workers
        self.epoch = 0
        self.consumed = 0
        self._restored = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = self.sampler.epoch = epoch
        self.consumed = 0

    def __iter__(self):
        if not self._restored:
            self.consumed = 0
        self._restored = False
        self.sampler.skip = self.consumed
        dl = torch.utils.data.DataLoader(self.dataset, sampler=self.sampler, batch_size=None,
                                         num_workers=self.num_workers, generator=torch.Generator().manual_seed(0))
        for b in dl:
            self.consumed += 1
            yield b

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, sd: dict) -> None:
        self.set_epoch(sd["epoch"])
        self.consumed = sd["consumed"]
        self._restored = True


class ToyModel(nn.Module):
    """Regression MLP returning the loss per element with the element count as sample size; dropout and a randomly
    skipped layer (layer-drop) make the loss depend on the RNG state, so an exact resume must restore it."""

    trainer_capabilities = ("step",)

    def __init__(self, dim: int = 8, hidden: int = 16, dropout: float = 0.1, layerdrop: float = 0.0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(dim, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 1)
        self.drop = nn.Dropout(dropout)
        self.layerdrop = layerdrop
        self.poison_calls: set[int] = set()  # training forward calls (0-based) that return a NaN loss
        self.calls = 0

    def set_step(self, step: int) -> None:
        self.step = step

    def forward(self, batch):
        h = torch.tanh(self.inp(batch["x"]))
        if not (self.training and self.layerdrop > 0 and torch.rand(()) < self.layerdrop):
            h = h + torch.tanh(self.mid(self.drop(h)))
        pred = self.out(self.drop(h))
        err = (pred - batch["y"]) ** 2
        loss = err.sum() / err.numel()
        if self.training:
            if self.calls in self.poison_calls:
                loss = loss * float("nan")
            self.calls += 1
        return StepOutput(loss, {"loss": float(loss.detach()), "acc": float((err < 0.5).float().mean())},
                          sample_size=batch["y"].numel())


class ToyStack(nn.Module):
    """A residual stack with its blocks in ``self.layers`` (what FSDP shards one by one); deterministic (no
    dropout) so that runs with different process counts can be compared."""

    def __init__(self, dim: int = 8, hidden: int = 16, num_layers: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh()) for _ in range(num_layers))
        self.out = nn.Linear(hidden, 1)
        self.calls = 0
        self.crash_at: int | None = None  # training forward call (0-based) that raises, to simulate a kill

    def forward(self, batch):
        if self.training:
            if self.calls == self.crash_at:
                raise RuntimeError("simulated kill")
            self.calls += 1
        h = torch.tanh(self.inp(batch["x"]))
        for layer in self.layers:
            h = h + layer(h)
        err = (self.out(h) - batch["y"]) ** 2
        loss = err.sum() / err.numel()
        return StepOutput(loss, {"loss": float(loss.detach())}, sample_size=batch["y"].numel())
