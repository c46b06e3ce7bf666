"""speechssl: self-supervised speech representation learning on Lhotse data."""
__version__ = "0.1.0"
