"""Deployment: ONNX export of any speechssl encoder, int8 quantisation, and an onnxruntime runner.

- :func:`export_onnx` writes an ONNX model directory (``model.onnx`` + ``config.json``): inputs ``wav`` [B, T]
  float32 at 16 kHz and ``lengths`` [B] int64 (valid samples; the padding mask is derived from them in the
  graph), outputs ``frames`` [B] int64 and ``hidden_state_L`` [B, T', D] for each chosen hidden state ``L``;
  batch and time axes are dynamic, and the graph holds no dropout or layer-drop (exported in eval mode).
  ``quantize="int8"`` adds onnxruntime's dynamic int8 quantisation of the matrix products.
- :func:`speechssl.models.io.quantize_int8` (re-exported here) is torch's dynamic int8 of the linear layers;
  ``export_pretrained(..., quantize="int8")`` writes it in the speechssl format, which ``load_pretrained`` (and
  so every SUPERB upstream) loads again.
- :class:`OnnxEncoder` runs an exported directory with onnxruntime.

``onnx`` and ``onnxruntime`` are the optional ``deploy`` extra (``pip install speechssl[deploy]``); they are
imported only when an ONNX function runs.
"""
from speechssl.models.io import quantize_int8

from .onnx_export import export_onnx, is_onnx_dir, quantize_onnx, resolve_layers
from .runner import OnnxEncoder

__all__ = ["export_onnx", "quantize_onnx", "resolve_layers", "is_onnx_dir", "OnnxEncoder", "quantize_int8"]
