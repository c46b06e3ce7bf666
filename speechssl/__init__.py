"""speechssl: self-supervised speech representation learning on Lhotse data."""
__version__ = "0.1.0"

__all__ = ["load_pretrained", "export_pretrained", "__version__"]


def __getattr__(name):
    # lazy so that `import speechssl` does not import torch
    if name in ("load_pretrained", "export_pretrained", "load_checkpoint_parts"):
        from speechssl.models import io

        return getattr(io, name)
    raise AttributeError(f"module 'speechssl' has no attribute {name!r}")
