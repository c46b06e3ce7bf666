"""Run an exported ONNX encoder directory with onnxruntime (CPU)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from speechssl.config import ConfigError
from speechssl.models.encoder_config import EncoderConfig
from speechssl.models.frames import FBANK_HOP, num_frames

from .onnx_export import require_onnx

__all__ = ["OnnxEncoder"]

ArrayLike = Union[np.ndarray, torch.Tensor]


class OnnxEncoder:
    """An ``export_onnx`` directory loaded into an onnxruntime session.

    Attributes: ``config`` (EncoderConfig), ``layers`` (the exported hidden-state indices), ``quantize``
    (None or "int8"), ``downsample_rate`` (input samples per frame), ``session``. ``num_threads``: onnxruntime's intra-op threads (None: its default, all
    cores); inter-op parallelism is off (the graph is one chain).
    """

    def __init__(self, path: Union[str, os.PathLike], num_threads: Optional[int] = None):
        require_onnx()
        import onnxruntime as ort

        d = Path(path)
        cfg_file = d / "config.json"
        doc = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        if doc.get("format") != "onnx":
            raise ConfigError(f"{d}: not an ONNX model directory (config.json with format 'onnx', written by "
                              f"`speechssl export MODEL OUT --format onnx`)")
        self.config = EncoderConfig.from_dict(doc["encoder"])
        self.layers: list[int] = list(doc["onnx"]["layers"])
        self.quantize: Optional[str] = doc["onnx"].get("quantize")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(num_threads or 0)
        opts.inter_op_num_threads = 1
        self.path = d / doc["onnx"]["file"]
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        self.downsample_rate = math.prod(int(s) for _, _, s in self.config.conv_layers) * (
            FBANK_HOP if self.config.frontend == "fbank" else 1)

    def num_params(self) -> int:
        """Weights stored in the graph (its initializers; int8 weights count one each)."""
        import onnx

        return sum(math.prod(t.dims) for t in onnx.load(str(self.path)).graph.initializer)

    def num_frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        """Encoder frames for ``num_samples`` samples: [B] -> [B] (as ``Encoder.num_frames``)."""
        return num_frames(self.config, num_samples)

    def __call__(self, wav: ArrayLike, lengths: Optional[ArrayLike] = None) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """wav [B, T] float at 16 kHz, lengths [B] valid samples (None: all full length) ->
        ({hidden-state index: [B, T', D] float32}, valid frames [B] int64)."""
        wav_np = np.ascontiguousarray(np.asarray(wav, dtype=np.float32))
        if wav_np.ndim != 2:
            raise ValueError(f"OnnxEncoder expects wav of shape [B, T], got {wav_np.shape}")
        if lengths is None:
            lens = np.full((wav_np.shape[0],), wav_np.shape[1], dtype=np.int64)
        else:
            lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
        frames, *states = self.session.run(None, {"wav": wav_np, "lengths": lens})
        return dict(zip(self.layers, states)), frames
