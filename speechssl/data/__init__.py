"""Data layer: corpora to Lhotse CutSets, audio loading with bad-input handling, features, unit labels,
datasets and resumable samplers, augmentation and Lhotse Shar for streaming.

Submodules are imported on use (``from speechssl.data.dataset import SpeechDataset``) so that importing
``speechssl.data`` stays cheap.
"""
