"""ONNX export of an :class:`~speechssl.models.encoder.Encoder`, and onnxruntime's dynamic int8 of the result.

The exporter is ``torch.onnx.export(..., dynamo=False)``, the TorchScript tracer. The torch.export-based exporter
(the default since torch 2.9) needs ``onnxscript`` and refuses the encoder's data-dependent branches (the
full-batch fast path that skips the attention mask) instead of tracing one side of them; the tracer records the
ops of one forward on an example batch, with the batch and time axes marked dynamic, and the parity tests
(``tests/test_deploy.py``) check that the graph generalises to other batch sizes and lengths. The encoder keeps
its traced path free of shape-dependent Python branches: it always masks padding while tracing, the fbank
front end frames audio with a strided convolution there (ONNX has no dynamic-length ``unfold``, and the tracer
no ``rfft``), and nothing in eval mode draws random numbers (dropout and layer-drop act only in training).

Directory written: ``model.onnx`` and ``config.json`` = ``{"format": "onnx", "encoder": EncoderConfig dict,
"onnx": {"file", "opset", "exporter", "layers", "quantize", "inputs", "outputs"}, "meta": {...}}``.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from speechssl.constants import SAMPLE_RATE
from speechssl.models.encoder import Encoder
from speechssl.utils.io import atomic_write_json

__all__ = ["export_onnx", "quantize_onnx", "resolve_layers", "is_onnx_dir", "require_onnx", "ONNX_FILE",
           "DEFAULT_OPSET"]

PathLike = Union[str, os.PathLike]
ONNX_FILE = "model.onnx"
DEFAULT_OPSET = 17  # LayerNormalization as one op (opset 17); onnxruntime >= 1.14 runs it


def resolve_layers(layers: Optional[Sequence[int]], num_layers: int) -> list[int]:
    """Hidden-state indices to export, checked: None = all ``0..num_layers`` (0 is the first layer's input,
    i the output of layer i, as ``EncoderOutput.hidden_states``); sorted, without repeats."""
    if layers is None:
        return list(range(num_layers + 1))
    chosen = sorted({int(l) for l in layers})
    bad = [l for l in chosen if not 0 <= l <= num_layers]
    if bad or not chosen:
        raise ValueError(f"export layers {list(layers)}: hidden-state indices must lie in 0..{num_layers} "
                         f"(0 = input of the first layer, {num_layers} = output of the last) for this "
                         f"{num_layers}-layer encoder")
    return chosen


class _ExportGraph(nn.Module):
    """What is traced: (wav [B, T] float32, lengths [B] int64) -> (frames [B] int64, one [B, T', D] tensor per
    chosen hidden state). Layers above the highest chosen one leave the graph (the exporter drops unused ops)."""

    def __init__(self, encoder: Encoder, layers: Sequence[int]):
        super().__init__()
        self.encoder, self.layers = encoder, list(layers)

    def forward(self, wav: Tensor, lengths: Tensor) -> tuple[Tensor, ...]:
        out = self.encoder(wav, lengths)
        return (out.lengths, *(out.hidden_states[i] for i in self.layers))


def _example_batch(encoder: Encoder) -> tuple[Tensor, Tensor]:
    """Two utterances of different lengths (1 s and 0.6 s): the traced graph takes the padded-batch path."""
    n = SAMPLE_RATE
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, n, generator=gen) * 0.1, torch.tensor([n, int(0.6 * n)])


def _trace_to_onnx(encoder: Encoder, layers: list[int], path: Path, opset: int) -> dict[str, Any]:
    """Trace ``encoder`` to ``path``; returns the input/output description for config.json."""
    outputs = ["frames"] + [f"hidden_state_{l}" for l in layers]
    axes = {"wav": {0: "batch", 1: "samples"}, "lengths": {0: "batch"}, "frames": {0: "batch"}}
    axes.update({name: {0: "batch", 1: "frames"} for name in outputs[1:]})
    graph = _ExportGraph(encoder, layers).eval()  # the exporter restores the wrapper's mode on all children
    with torch.no_grad(), warnings.catch_warnings():
        # the legacy exporter's notice that dynamo is the default now (the choice is explained above)
        warnings.simplefilter("ignore", DeprecationWarning)
        # torch.as_tensor on a tensor that is already an input is traced as that input, not as a constant
        warnings.filterwarnings("ignore", message="torch.as_tensor results are registered as constants")
        # strided slices (the fbank framing) stay unfolded: a speed note, not a correctness one
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        torch.onnx.export(graph, _example_batch(encoder), str(path), input_names=["wav", "lengths"],
                          output_names=outputs, dynamic_axes=axes, opset_version=opset, dynamo=False,
                          do_constant_folding=True)
    d = encoder.hidden_size
    return {
        "inputs": {"wav": "float32 [batch, samples], 16 kHz", "lengths": "int64 [batch], valid samples"},
        "outputs": {"frames": "int64 [batch], valid frames",
                    **{name: f"float32 [batch, frames, {d}]" for name in outputs[1:]}},
    }


def require_onnx() -> None:
    """Raise ModuleNotFoundError naming the ``deploy`` extra when onnx or onnxruntime is missing."""
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ModuleNotFoundError:
            raise ModuleNotFoundError(f"ONNX export and inference need the '{name}' package: pip install "
                                      f"'speechssl[deploy]' (or pip install onnx onnxruntime)", name=name) from None


def quantize_onnx(src: PathLike, dst: PathLike) -> Path:
    """onnxruntime dynamic int8 of an ONNX encoder: every MatMul with a constant weight gets int8 weights per
    output channel and activations quantised per call (``DynamicQuantizeLinear`` + ``MatMulInteger``); the
    convolutions, normalisations and attention products stay float32."""
    require_onnx()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # the quantiser logs a line per float tensor it leaves alone, and advice to pre-process, on the root logger
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return Path(dst)


def export_onnx(encoder: Encoder, out_dir: PathLike, layers: Optional[Sequence[int]] = None,
                quantize: Optional[Literal["int8"]] = None, opset: int = DEFAULT_OPSET,
                meta: Optional[dict[str, Any]] = None) -> Path:
    """Write ``encoder`` (float, any family, pruned or not) as an ONNX model directory; see the module docstring.
    ``layers``: hidden-state indices to output (None: all); ``quantize="int8"``: onnxruntime dynamic int8."""
    require_onnx()
    import onnx

    if quantize not in (None, "int8"):
        raise ValueError(f"export_onnx quantize must be None or 'int8', got {quantize!r}")
    if any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in encoder.modules()):
        raise ValueError("export_onnx needs the float encoder: a torch int8 model does not trace to ONNX; export "
                         "the float model with quantize='int8' instead (onnxruntime quantises it)")
    chosen = resolve_layers(layers, encoder.num_layers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / ONNX_FILE
    fp32 = out / "model.fp32.onnx" if quantize else target
    io_desc = _trace_to_onnx(encoder.eval(), chosen, fp32, opset)
    onnx.checker.check_model(str(fp32))
    if quantize:
        quantize_onnx(fp32, target)
        fp32.unlink()
    atomic_write_json(out / "config.json", {
        "format": "onnx", "encoder": encoder.config.to_dict(),
        "onnx": {"file": ONNX_FILE, "opset": opset, "exporter": "torchscript", "layers": chosen,
                 "quantize": quantize, **io_desc},
        "meta": dict(meta or {}),
    })
    return out


def is_onnx_dir(path: PathLike) -> bool:
    """True when ``path`` is a directory written by :func:`export_onnx`."""
    cfg = Path(path) / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("format") == "onnx"
