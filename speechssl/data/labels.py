"""Frame-level unit labels (k-means ids) attached to cuts, and their alignment to encoder frames.

Units are stored losslessly as Lhotse temporal arrays (``NumpyFilesWriter``: one ``.npy`` per cut, integer
dtype kept), under ``cut.custom[name]`` with their ``frame_shift``; ``label_rate(cut, name)`` reads the rate
back (100 Hz for MFCC labels, 50 Hz for labels from a 20 ms encoder layer).

Alignment rule (fairseq HuBERT's): encoder frame ``i`` (at ``frame_rate`` Hz, counted from ``offset`` seconds
into the utterance) takes label ``floor((offset + i / frame_rate) * label_rate)``; frames past the end of the
label sequence get ``PAD_ID`` (-100), which is never a real id and is ignored by cross-entropy.
"""
from __future__ import annotations

import numpy as np
import torch

from speechssl.constants import PAD_ID


def store_units(cut, units, writer, name: str = "kmeans", frame_shift: float = 0.02):
    """Store ``units`` (int array [T_label]) for ``cut`` with ``writer`` and return the cut with ``custom[name]``.

    ``writer`` is a Lhotse array writer; use ``lhotse.NumpyFilesWriter(dir)`` (lossless). ``frame_shift`` is
    the label period in seconds (0.01 for 100 Hz, 0.02 for 50 Hz). The array is anchored at ``cut.start`` so
    Lhotse's truncation and partial reads of the cut slice the labels with it.
    """
    arr = np.asarray(units.cpu().numpy() if isinstance(units, torch.Tensor) else units)
    if arr.ndim != 1:
        raise ValueError(f"store_units: cut '{cut.id}': units must be 1-D [T], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"store_units: cut '{cut.id}': units must be integers, got {arr.dtype}")
    if (arr < 0).any():
        raise ValueError(f"store_units: cut '{cut.id}': unit ids must be >= 0 (negative ids are padding)")
    arr = arr.astype(np.int32 if arr.max(initial=0) < 2**31 else np.int64)
    manifest = writer.store_array(cut.id, arr, frame_shift=frame_shift, temporal_dim=0, start=cut.start)
    return cut.with_custom(name, manifest)


def _units_manifest(cut, name: str):
    from lhotse.cut import MixedCut

    if isinstance(cut, MixedCut):
        for track in cut.tracks:
            c = track.cut
            if getattr(c, "custom", None) and name in c.custom:
                return c.custom[name]
        return None
    return (cut.custom or {}).get(name)


def label_rate(cut, name: str = "kmeans") -> float:
    """Label frames per second of ``cut``'s units ``name`` (``1 / frame_shift``); KeyError if absent."""
    m = _units_manifest(cut, name)
    if m is None or getattr(m, "frame_shift", None) is None:
        raise KeyError(f"cut '{cut.id}' has no temporal units '{name}'")
    return 1.0 / m.frame_shift


def load_units(cut, name: str = "kmeans") -> np.ndarray:
    """The cut's units as int64 [T_label], on the cut's own time axis.

    For a mixed cut (noise added by CutMix) the labels come from the one track that has them; if that track
    starts late the leading frames are ``PAD_ID``, and nothing is appended past its end (alignment pads with
    ``PAD_ID``), so mixing never invents a real unit id.
    """
    from lhotse.cut import MixedCut

    if isinstance(cut, MixedCut):
        for track in cut.tracks:
            c = track.cut
            if getattr(c, "custom", None) and name in c.custom:
                units = np.asarray(c.load_custom(name)).astype(np.int64)
                lead = int(round(track.offset / c.custom[name].frame_shift))
                if lead > 0:
                    units = np.concatenate([np.full(lead, PAD_ID, dtype=np.int64), units])
                return units
        raise KeyError(f"mixed cut '{cut.id}' has no track with units '{name}'")
    if not (cut.custom and name in cut.custom):
        raise KeyError(f"cut '{cut.id}' has no units '{name}'")
    return np.asarray(cut.load_custom(name)).astype(np.int64)


def align_units(units, label_rate: float, num_frames: int, frame_rate: float = 50.0, offset: float = 0.0) -> torch.Tensor:
    """Map labels to encoder frames: LongTensor [num_frames].

    ``units`` int array/tensor [T_label] at ``label_rate`` Hz; encoder frame ``i`` takes label
    ``floor((offset + i / frame_rate) * label_rate)`` where ``offset`` (seconds) is where the encoder input
    starts inside the labelled utterance (a crop). Frames whose label index falls outside ``units`` are
    ``PAD_ID`` (-100).
    """
    u = torch.as_tensor(np.asarray(units) if not isinstance(units, torch.Tensor) else units).long().flatten()
    i = torch.arange(int(num_frames), dtype=torch.float64)
    # tiny epsilon: 0.02 * 50 style products must floor to the exact integer, not one below
    idx = torch.floor((offset + i / frame_rate) * label_rate + 1e-6).long()
    out = torch.full((int(num_frames),), PAD_ID, dtype=torch.long)
    ok = (idx >= 0) & (idx < u.numel())
    out[ok] = u[idx[ok]]
    return out


# ------------------------------------------------------------------------------------ phone alignments
def _alignment_items(cut, kind: str) -> tuple[list, float]:
    """(alignment items of ``kind`` from the cut's supervisions, shift) with recording time = cut time + shift.

    Lhotse keeps alignment items on the recording's time axis (truncation shifts supervisions, not their
    items); for a mixed cut the items come from the first track that has them.
    """
    from lhotse.cut import MixedCut

    if isinstance(cut, MixedCut):
        for track in cut.tracks:
            items, shift = _alignment_items(track.cut, kind)
            if items:
                return items, shift - track.offset
        return [], 0.0
    items = [it for sup in cut.supervisions for it in ((sup.alignment or {}).get(kind) or [])]
    return items, float(getattr(cut, "start", 0.0) or 0.0)


def has_alignment(cut, kind: str = "phone") -> bool:
    """Whether one of the cut's supervisions carries an alignment of ``kind`` (``supervision.alignment[kind]``)."""
    return bool(_alignment_items(cut, kind)[0])


def alignment_frame_labels(cut, num_frames: int, frame_rate: float = 50.0, offset: float = 0.0,
                           kind: str = "phone", gap: str | None = None) -> list[str | None]:
    """Frame-level symbols [num_frames] from the cut's ``kind`` alignment (Lhotse ``AlignmentItem`` lists).

    Frame ``i`` (at ``frame_rate`` Hz, counted from ``offset`` seconds into the cut) takes the symbol of the item
    that covers its centre ``offset + (i + 0.5) / frame_rate``; frames no item covers get ``gap`` (None: unlabelled).
    Raises KeyError when the cut has no such alignment.
    """
    items, shift = _alignment_items(cut, kind)
    if not items:
        raise KeyError(f"cut '{cut.id}' has no '{kind}' alignment (supervision.alignment['{kind}'])")
    items = sorted(items, key=lambda it: it.start)
    starts = np.array([it.start for it in items], dtype=np.float64)
    ends = starts + np.array([it.duration for it in items], dtype=np.float64)
    t = shift + offset + (np.arange(int(num_frames), dtype=np.float64) + 0.5) / frame_rate
    j = np.searchsorted(starts, t, side="right") - 1  # the last item starting at or before each centre
    out: list[str | None] = [gap] * int(num_frames)
    for i in np.flatnonzero((j >= 0) & (t < ends[np.clip(j, 0, None)])):
        out[i] = items[j[i]].symbol
    return out
