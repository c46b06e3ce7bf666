"""Values shared across the toolkit. Import them from here; never restate them in a module."""
from __future__ import annotations

SAMPLE_RATE = 16000
"""Audio sample rate (Hz) of every model, manifest and feature in speechssl."""

PAD_ID = -100
"""Padding in frame-level integer targets (unit labels, CTC-free frame labels); never a real unit id, and the
``ignore_index`` of every cross-entropy over them."""

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
"""The ten Speech Commands keywords scored by the keyword-spotting task (plus ``_unknown_`` and ``_silence_``)."""

PRECISIONS = ("fp32", "bf16", "fp16")
"""Numeric precision names accepted by every config (``trainer.precision``, SUPERB ``trainer.precision``)."""
