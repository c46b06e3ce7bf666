"""Where and how a training loop runs: device, precision, processes, reductions. Shared by every loop.

One process per device (``accelerate launch`` / ``torchrun`` start several); each builds one ``Runtime``. It owns
the toolkit's only ``accelerate.Accelerator`` construction, so device choice, precision names, loss scaling and
the reset of accelerate's per-process state behave the same in pretraining, compression and SUPERB.

Precision names are ``fp32 | bf16 | fp16`` (``speechssl.constants.PRECISIONS``); fp16 uses dynamic loss scaling
and needs a GPU. Device is ``auto | cpu | cuda``.

Usage::

    rt = Runtime(precision="bf16", device="auto", config_key="trainer")
    model, opt = rt.acc.prepare(model, opt)       # the Accelerator, for what accelerate already does well
    with rt.autocast():
        loss = model(batch).loss
    rt.backward(loss)
    total = rt.sum([loss_sum, count])             # float64 all-reduce over ranks
"""
from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import torch

from speechssl.config import ConfigError
from speechssl.constants import PRECISIONS

__all__ = ["Runtime", "accelerate_state_conflicts", "resolve_cpu", "world_size_from_env", "move_to_device",
           "peak_memory_mb", "is_oom"]

_ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def world_size_from_env() -> int:
    """Processes in this job as the launcher announced them (1 when started plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_cpu(device: str, config_key: str) -> bool:
    """Whether ``device`` (auto | cpu | cuda) means the CPU here; 'cuda' without a GPU is a ConfigError."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"config key '{config_key}.device' must be auto|cpu|cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key '{config_key}.device' is 'cuda' but no CUDA device is available")
    return device == "cpu" or not torch.cuda.is_available()


def move_to_device(obj: Any, device: torch.device) -> Any:
    """Recursively move tensors in dicts/lists/tuples to ``device`` (other leaves untouched)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and obj and any(isinstance(v, (torch.Tensor, dict)) for v in obj):
        return type(obj)(move_to_device(v, device) for v in obj)
    return obj


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA max allocated on GPU, else the process's peak resident set size (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is an out-of-memory error of the device."""
    oom_type = getattr(torch, "OutOfMemoryError", None)
    return (oom_type is not None and isinstance(e, oom_type)) or "out of memory" in str(e).lower()


def _require_tensorboard(config_key: str) -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        try:
            import tensorboardX  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"config key '{config_key}.tensorboard' is true but neither tensorboard nor "
                              "tensorboardX is installed (pip install tensorboard)") from e


def accelerate_state_conflicts(state: dict, precision: str, cpu: bool) -> bool:
    """Whether accelerate's per-process shared state (a dict; empty before the first Accelerator) was set up for
    another precision (accelerate's name: no | bf16 | fp16) or another device type than a new Runtime asks for."""
    if not state:
        return False
    device = getattr(state.get("device"), "type", None)
    return state.get("_mixed_precision") != precision or (device is not None and (device == "cpu") != cpu)


class Runtime:
    """Device, rank and world size, autocast, loss scaling and collectives for one training process.

    Args:
        precision: fp32 | bf16 | fp16.
        device: auto | cpu | cuda.
        config_key: the config section these came from (``trainer``), named in errors.
        find_unused_parameters: DDP's flag (on for models with layer-drop).
        log_dir: where TensorBoard events go; None = no tracker (with one, tensorboard or tensorboardX must be
            installed: a ConfigError names ``{config_key}.tensorboard``).
    """

    def __init__(self, precision: str = "fp32", device: str = "auto", *, config_key: str = "trainer",
                 find_unused_parameters: bool = False, log_dir: str | os.PathLike | None = None):
        if precision not in PRECISIONS:
            raise ConfigError(f"config key '{config_key}.precision' must be one of {'|'.join(PRECISIONS)}, "
                              f"got {precision!r}")
        cpu = resolve_cpu(device, config_key)
        if precision == "fp16" and cpu:
            raise ConfigError(f"config key '{config_key}.precision': fp16 needs a GPU; use bf16 on CPU")
        if log_dir is not None:
            _require_tensorboard(config_key)
        self.precision = precision
        self.acc = self._make_accelerator(_ACCELERATE_PRECISION[precision], cpu, find_unused_parameters, log_dir)

    @staticmethod
    def _make_accelerator(mixed_precision: str, cpu: bool, find_unused: bool, log_dir):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

        if (accelerate_state_conflicts(AcceleratorState._shared_state, mixed_precision, cpu)
                and world_size_from_env() == 1):
            # accelerate keeps one global state per process; a second loop with another precision or device
            # (tests, notebooks, several SUPERB tasks) may reset it when not distributed
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
        project = None
        if log_dir is not None:
            project = ProjectConfiguration(project_dir=str(log_dir), logging_dir=str(log_dir))
        return Accelerator(
            cpu=cpu, mixed_precision=mixed_precision, gradient_accumulation_steps=1,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
            log_with="tensorboard" if log_dir is not None else None, project_config=project,
            step_scheduler_with_optimizer=False,
        )

    # ------------------------------------------------------------------ where
    @property
    def device(self) -> torch.device:
        return self.acc.device

    @property
    def rank(self) -> int:
        return self.acc.process_index

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    # ------------------------------------------------------------- precision
    def autocast(self):
        return self.acc.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled for fp16."""
        self.acc.backward(loss)

    def clip(self, params: Sequence[torch.nn.Parameter], max_norm: float) -> float:
        """Global gradient norm, clipped to ``max_norm`` (fp16 gradients are unscaled first)."""
        return float(self.acc.clip_grad_norm_(params, max_norm))

    # ------------------------------------------------------------ collectives
    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks, in float64 (counts, weighted sums)."""
        if self.world == 1:
            return [float(v) for v in values]
        vec = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        return self.acc.reduce(vec, reduction="sum").tolist()

    def mean(self, value: float) -> float:
        """Mean of a float over ranks."""
        return self.sum([value])[0] / self.world

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank says True (decisions every rank must take together)."""
        return self.sum([1.0 if flag else 0.0])[0] > 0

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Is the loss finite on every rank? (All ranks must agree to skip a step.)"""
        return not self.any(not bool(torch.isfinite(loss.detach()).all()))

    def gather(self, items: list) -> list[Any]:
        """Every rank's list, concatenated in rank order, on every rank."""
        if self.world == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Mean of the gradients over ranks in one flat all-reduce (a missing gradient counts as zero); for loops
        that do not wrap their model in DDP."""
        if self.world == 1 or not params:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        flat = self.acc.reduce(flat, reduction="mean")
        i = 0
        for p in params:
            n = p.numel()
            p.grad = flat[i:i + n].view_as(p).clone()
            i += n

    def broadcast_params(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Rank 0's values on every rank."""
        if self.world > 1:
            import torch.distributed as dist

            with torch.no_grad():
                for p in params:
                    dist.broadcast(p.data, src=0)

    def barrier(self) -> None:
        self.acc.wait_for_everyone()

    def shard(self, batches: list, config_key: str = "data.max_duration") -> list:
        """This rank's share of a batch list every rank built the same way: the first ``len // world * world``
        batches dealt round-robin, so every rank takes the same number of steps."""
        if self.world == 1:
            return batches
        n = len(batches) // self.world * self.world
        if n == 0:
            raise ValueError(f"{len(batches)} batch(es) for {self.world} processes: lower {config_key} "
                             "(config key) or use fewer processes")
        return batches[self.rank:n:self.world]

    def release(self) -> None:
        """Drop accelerate's references to a finished optimiser (a sweep trains many heads)."""
        self.acc.free_memory()
