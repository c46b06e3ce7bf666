"""Hidden states for downstream training: computed by the upstream on demand, or cached once for a frozen one.

A frozen upstream gives the same hidden states every epoch and every learning-rate trial, so
:class:`FeatureSource` can compute them once per cut and keep them in memory and/or on disk (one safetensors
file per cut under a directory named by the upstream's fingerprint). It counts what the cache cost and what it
served, so the time saved is measured rather than assumed (:meth:`FeatureSource.cache_stats`).

Audio is read through the same :class:`~speechssl.data.dataset.SpeechDataset` as pretraining batches (waveform
mode: padded batch and lengths, the same bad-input checks). Bad audio (``data.skip_bad``):
:meth:`FeatureSource.screen` decodes each utterance once (filling the cache when there is one) and records the
ones that raise :class:`~speechssl.data.audio.BadCutError` in ``source.bad``, so the task loop can drop them
before any head trains.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from speechssl.constants import SAMPLE_RATE
from speechssl.data.audio import BadCutError
from speechssl.data.dataset import SpeechDataset
from speechssl.superb.upstream import Upstream, is_random_spec, random_init_buffers, random_init_config
from speechssl.utils.progress import progress_bar

__all__ = ["Example", "FeatureSource", "upstream_fingerprint"]

log = logging.getLogger(__name__)


@dataclass
class Example:
    """One utterance of a task: its Lhotse ``cut``, or ``audio`` (a float32 array at 16 kHz, e.g. in tests and
    benchmarks) from which an in-memory cut is made, so that both are read the same way."""

    id: str
    num_samples: int
    label: Any = None
    cut: Any = None
    audio: np.ndarray | None = None
    session: int | None = None

    def __post_init__(self):
        if self.cut is None and self.audio is not None:
            self.cut = _memory_cut(self.id, self.audio)


def _memory_cut(cut_id: str, audio: np.ndarray):
    """A cut whose recording is ``audio`` held in memory as lossless float WAV."""
    import soundfile as sf
    from lhotse import Recording

    buf = io.BytesIO()
    sf.write(buf, np.asarray(audio, dtype=np.float32), SAMPLE_RATE, format="WAV", subtype="FLOAT")
    return Recording.from_bytes(buf.getvalue(), recording_id=cut_id).to_cut()


def upstream_fingerprint(spec: str, mode: str = "frozen", extra: str = "", seed: int = 0) -> str:
    """A short hash naming a cache directory: the upstream spec, its files' sizes and mtimes, and ``extra``.

    A ``random:TARGET`` spec hashes differently from TARGET itself (the spec string leads), and its states
    depend on the architecture, ``seed`` and TARGET's buffers (input statistics) rather than on TARGET's weights:
    those go into the key, so a changed seed, architecture or statistics never reuses stale states.
    """
    parts = [spec, mode, extra]
    if is_random_spec(spec):
        arch = random_init_config(spec).to_dict()
        parts += [f"seed={int(seed)}", json.dumps(arch, sort_keys=True, default=str)]
        parts += [f"{k}:{hashlib.sha1(v.numpy().tobytes()).hexdigest()}"
                  for k, v in sorted(random_init_buffers(spec).items())]
        return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]
    p = Path(spec)
    if p.exists():
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        parts += [f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files if f.is_file()]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def _safe_name(cut_id: str) -> str:
    h = hashlib.sha1(cut_id.encode()).hexdigest()
    return f"{h[:2]}/{h}.safetensors"


class FeatureSource:
    """Padded hidden states for a list of examples.

    ``cache=True`` (frozen upstreams only) computes each cut's states once, in length-sorted batches of
    ``batch_seconds`` of audio, and then serves them from memory (``memory=True``) or from ``cache_dir``.
    States are stored in ``dtype`` (float32 keeps results identical to running the upstream; float16 halves
    the space).
    """

    def __init__(self, upstream: Upstream, cache: bool = True, cache_dir: str | os.PathLike | None = None,
                 memory: bool = True, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 batch_seconds: float = 60.0, progress: bool = True):
        if cache and not upstream.frozen:
            log.info("hidden-state cache disabled: the upstream is not frozen (mode %s)", upstream.mode)
            cache = False
        if cache and not memory and cache_dir is None:
            raise ValueError("a disk-only hidden-state cache needs cache_dir (config key cache.dir)")
        self.upstream, self.cache, self.memory, self.dtype = upstream, cache, memory, dtype
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.device = torch.device(device)
        self.batch_seconds, self.progress = batch_seconds, progress
        self._audio = {False: SpeechDataset(), True: SpeechDataset(skip_bad=True)}  # by skip_bad
        self._mem: dict[str, torch.Tensor] = {}
        self._frames: dict[str, int] = {}
        self.bad: dict[str, BadCutError] = {}  # example id -> its error, found by screen()
        self._screened: set[str] = set()
        self.extract_s = 0.0       # upstream time spent filling the cache
        self.frames_cached = 0
        self.load_s = 0.0          # time spent reading the cache back
        self.frames_served = 0

    # -- upstream -------------------------------------------------------------------------------------------
    def run_upstream(self, wav: torch.Tensor, lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """[B, T], [B] -> list of [B, T', D] zeroed past each item's frames, frames [B] (on ``self.device``)."""
        states, frames = self.upstream(wav.to(self.device), lengths.to(self.device))
        # padding frames hold whatever the upstream computed there; zero them so that a state never depends on
        # which other utterances shared its batch (cached and uncached runs then agree exactly)
        valid = (torch.arange(states[0].shape[1], device=frames.device)[None] < frames[:, None]).unsqueeze(-1)
        return [h * valid.to(h.dtype) for h in states], frames

    def _has(self, cut_id: str) -> bool:
        if cut_id in self._mem:
            return True
        return self.cache_dir is not None and (self.cache_dir / _safe_name(cut_id)).exists()

    def prepare(self, examples: Sequence[Example], desc: str = "caching hidden states", skip_bad: bool = False
                ) -> None:
        """Fill the cache for ``examples`` (no-op without a cache or when all are cached). ``skip_bad``: an
        utterance whose audio is bad is recorded in ``self.bad`` and left out instead of raising."""
        if not self.cache:
            return
        todo = [e for e in examples if not self._has(e.id)]
        if not todo:
            return
        todo.sort(key=lambda e: e.num_samples)
        batches, cur, budget = [], [], int(self.batch_seconds * SAMPLE_RATE)
        for e in todo:
            if cur and (len(cur) + 1) * e.num_samples > budget:
                batches.append(cur)
                cur = []
            cur.append(e)
        if cur:
            batches.append(cur)
        t0 = time.perf_counter()
        with torch.no_grad():
            for batch in progress_bar(batches, desc=desc, unit="batch", disable=not self.progress, leave=False):
                wav, lens, batch = self._load_audio(batch, skip_bad)
                if not batch:
                    continue
                states, frames = self.run_upstream(wav, lens)
                stacked = torch.stack(states, 0).to(self.dtype).cpu()  # [L, B, T, D]
                for i, e in enumerate(batch):
                    item = stacked[:, i, : int(frames[i])].contiguous()
                    self._store(e.id, item)
                    self.frames_cached += item.shape[1]
        self.extract_s += time.perf_counter() - t0

    def _load_audio(self, examples: Sequence[Example], skip_bad: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, list[Example]]:
        """Padded audio [B, T], lengths [B] and the examples they hold; with ``skip_bad`` a bad one is recorded
        in ``self.bad`` and left out, else its :class:`~speechssl.data.audio.BadCutError` is raised."""
        batch, errors = self._audio[skip_bad].collate([e.cut for e in examples])
        if not errors:
            return batch["audio"], batch["audio_lens"], list(examples)
        by_cut = {err.cut_id: err for err in errors}
        kept = []
        for e in examples:
            if e.cut.id in by_cut:
                self.bad[e.id] = by_cut[e.cut.id]
            else:
                kept.append(e)
        return batch["audio"], batch["audio_lens"], kept

    def screen(self, examples: Sequence[Example], desc: str = "checking audio") -> list[Example]:
        """The examples whose audio is bad (each recorded in ``self.bad``), after decoding every one once.

        With a cache this is the cache fill itself, so screening costs nothing extra; without one each
        utterance is decoded once here and again when it is trained on. Utterances screened before (another
        split, fold or task sharing this source) are not decoded again.
        """
        todo = [e for e in examples if e.id not in self._screened and e.id not in self.bad]
        if self.cache:
            self.prepare(todo, desc=desc, skip_bad=True)
        else:
            for e in todo:
                self._load_audio([e], skip_bad=True)
        self._screened.update(e.id for e in todo)
        return [e for e in examples if e.id in self.bad]

    def _store(self, cut_id: str, item: torch.Tensor) -> None:
        if self.memory:
            self._mem[cut_id] = item
        if self.cache_dir is not None:
            from safetensors.torch import save_file

            from speechssl.utils.io import atomic_write

            path = self.cache_dir / _safe_name(cut_id)
            atomic_write(path, lambda tmp: save_file({"states": item}, tmp, metadata={"cut_id": cut_id}))

    def _load(self, cut_id: str) -> torch.Tensor:
        if cut_id in self._mem:
            return self._mem[cut_id]
        if self.cache_dir is None:
            raise KeyError(f"cut {cut_id} is not in the hidden-state cache")
        from safetensors.torch import load_file

        item = load_file(str(self.cache_dir / _safe_name(cut_id)))["states"]
        if self.memory:
            self._mem[cut_id] = item
        return item

    # -- batches --------------------------------------------------------------------------------------------
    def states(self, examples: Sequence[Example], crop_frames: int | None = None,
               rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked, zero-padded states [L, B, T, D] and frames [B] for ``examples``.

        ``crop_frames``: a random window of at most that many frames per utterance (training crops); ``rng``
        picks its start.
        """
        rng = rng or np.random.default_rng()
        if self.cache:
            self.prepare([e for e in examples if not self._has(e.id)])
            t0 = time.perf_counter()
            items = []
            for e in examples:
                item = self._load(e.id)
                if crop_frames and item.shape[1] > crop_frames:
                    s = int(rng.integers(0, item.shape[1] - crop_frames + 1))
                    item = item[:, s:s + crop_frames]
                items.append(item)
            frames = torch.tensor([it.shape[1] for it in items], dtype=torch.long)
            L, _, D = items[0].shape
            out = torch.zeros(L, len(items), int(frames.max()), D, dtype=items[0].dtype)
            for i, it in enumerate(items):
                out[:, i, : it.shape[1]] = it
            self.load_s += time.perf_counter() - t0
            self.frames_served += int(frames.sum())
            return out.to(self.device, torch.float32), frames.to(self.device)
        wav, lens, _ = self._load_audio(examples)
        if crop_frames:
            wav, lens = _crop(wav, lens, crop_frames * self.upstream.downsample_rate, self.upstream.downsample_rate,
                              rng)
        states, frames = self.run_upstream(wav, lens)
        return torch.stack(states, 0), frames

    def counters(self) -> tuple[float, int, float, int]:
        """(extract_s, frames_cached, load_s, frames_served) so far; pass to :meth:`cache_stats` as ``since``."""
        return self.extract_s, self.frames_cached, self.load_s, self.frames_served

    def cache_stats(self, since: tuple[float, int, float, int] | None = None) -> dict:
        """What the cache cost and saved (since the ``since`` counters, e.g. for one task of several sharing this
        source): ``saved_s`` = upstream time the served frames would have cost at the measured extraction speed,
        minus the extraction and reading time actually spent. A lower bound: extraction runs in large sorted
        batches, while without the cache the upstream would run on every (smaller, padded) training batch."""
        e0, c0, l0, s0 = since or (0.0, 0, 0.0, 0)
        extract_s, cached, load_s, served = self.extract_s - e0, self.frames_cached - c0, self.load_s - l0, \
            self.frames_served - s0
        if not self.cache or self.frames_cached == 0:
            return {"enabled": bool(self.cache)}
        per_frame = self.extract_s / self.frames_cached  # extraction speed over everything this source encoded
        return {
            "enabled": True, "extract_s": round(extract_s, 3), "load_s": round(load_s, 3),
            "frames_cached": cached, "frames_served": served,
            "passes": round(served / max(1, cached), 2) if cached else None,
            "saved_s": round(served * per_frame - extract_s - load_s, 3),
        }


def _crop(wav: torch.Tensor, lens: torch.Tensor, n: int, step: int, rng: np.random.Generator
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """A random window of at most ``n`` samples per row of ``wav`` [B, T] (starts on multiples of ``step``, so
    the window covers whole upstream frames), zero-padded again: [B, T'] and lengths [B]."""
    starts, new = [], []
    for length in lens.tolist():
        s = int(rng.integers(0, (length - n) // step + 1)) * step if length > n else 0
        starts.append(s)
        new.append(min(length, n))
    out = wav.new_zeros(wav.shape[0], max(new, default=0))
    for i, (s, m) in enumerate(zip(starts, new)):
        out[i, :m] = wav[i, s: s + m]
    return out, torch.tensor(new, dtype=torch.long)
