"""Encoder family, presets and checkpoint import/export (tensors only; nothing here imports data/train/cli)."""
from .encoder import Encoder, EncoderGates, EncoderOutput, build_encoder
from .encoder_config import EncoderConfig
from .presets import PRESETS, get_preset, list_presets

__all__ = [
    "Encoder", "EncoderConfig", "EncoderGates", "EncoderOutput", "build_encoder", "PRESETS", "get_preset",
    "list_presets", "load_pretrained", "export_pretrained",
]


def __getattr__(name):
    # checkpoint I/O is imported on first use so that `import speechssl.models` stays light
    if name in ("load_pretrained", "export_pretrained", "load_checkpoint_parts"):
        from . import io

        return getattr(io, name)
    raise AttributeError(f"module 'speechssl.models' has no attribute {name!r}")
