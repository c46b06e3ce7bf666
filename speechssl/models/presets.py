"""Named encoder configurations. ``conf/model/NAME.yaml`` holds the same dicts (kept equal by a test).

Base/Large follow the published fairseq / Hugging Face configurations; the tiny presets (4 layers, 256 dims,
4 heads, FFN 1024, 128-channel CNN) are for CPU recipes and tests.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Callable

import yaml

from speechssl.config import ConfigError

from .encoder_config import BASE_CONV_LAYERS, EncoderConfig

__all__ = [
    "wav2vec2_base", "wav2vec2_large", "hubert_base", "hubert_large", "wavlm_base", "wavlm_large", "bestrq",
    "tiny_wav2vec2", "tiny_hubert", "tiny_wavlm", "tiny_bestrq", "small_hubert", "PRESETS", "get_preset", "list_presets",
]

TINY_CONV_LAYERS = [[128, 10, 5]] + [[128, 3, 2]] * 4 + [[128, 2, 2]] * 2


def _conv(layers) -> list[list[int]]:
    return [list(l) for l in layers]


def _base(model_type: str, **kw) -> EncoderConfig:
    """12 post-LN layers, 768 dims, group-norm CNN (fairseq Base pretraining hyper-parameters)."""
    args = dict(
        model_type=model_type, conv_layers=_conv(BASE_CONV_LAYERS), extractor_mode="group_norm", conv_bias=False,
        feature_grad_mult=0.1, hidden_size=768, num_layers=12, num_heads=12, ffn_dim=3072, layer_norm_first=False,
        dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, feature_dropout=0.1, layerdrop=0.05,
    )
    args.update(kw)
    return EncoderConfig(**args)


def _large(model_type: str, **kw) -> EncoderConfig:
    """24 pre-LN layers, 1024 dims, layer-norm CNN with bias, normalised waveform input."""
    args = dict(
        model_type=model_type, conv_layers=_conv(BASE_CONV_LAYERS), extractor_mode="layer_norm", conv_bias=True,
        normalize_waveform=True, feature_grad_mult=1.0, hidden_size=1024, num_layers=24, num_heads=16,
        ffn_dim=4096, layer_norm_first=True, dropout=0.0, attention_dropout=0.1, activation_dropout=0.0,
        feature_dropout=0.1, layerdrop=0.05,
    )
    args.update(kw)
    return EncoderConfig(**args)


def _tiny(model_type: str, **kw) -> EncoderConfig:
    args = dict(
        model_type=model_type, conv_layers=_conv(TINY_CONV_LAYERS), extractor_mode="group_norm", conv_bias=False,
        feature_grad_mult=1.0, hidden_size=256, num_layers=4, num_heads=4, ffn_dim=1024, layer_norm_first=False,
        dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, feature_dropout=0.1, layerdrop=0.0,
        conv_pos=32, conv_pos_groups=16,
    )
    args.update(kw)
    return EncoderConfig(**args)


def wav2vec2_base() -> EncoderConfig:
    return _base("wav2vec2")


def wav2vec2_large() -> EncoderConfig:
    """wav2vec 2.0 Large (LV-60 style: layer-norm CNN, pre-LN)."""
    return _large("wav2vec2")


def hubert_base() -> EncoderConfig:
    return _base("hubert")


def hubert_large() -> EncoderConfig:
    return _large("hubert")


def wavlm_base() -> EncoderConfig:
    return _base("wavlm", relative_position=True, num_buckets=320, max_distance=800)


def wavlm_large() -> EncoderConfig:
    return _large("wavlm", relative_position=True, num_buckets=320, max_distance=800)


def bestrq() -> EncoderConfig:
    """BEST-RQ-style: 80-dim fbank, two stride-2 convs (40 ms frames), 12 pre-LN layers of 768 dims."""
    return EncoderConfig(
        model_type="bestrq", frontend="fbank", conv_layers=[[384, 3, 2], [384, 3, 2]], conv_bias=True,
        hidden_size=768, num_layers=12, num_heads=12, ffn_dim=3072, layer_norm_first=True, dropout=0.1,
        attention_dropout=0.1, activation_dropout=0.0, feature_dropout=0.1, layerdrop=0.0, feature_grad_mult=1.0,
    )


def tiny_wav2vec2() -> EncoderConfig:
    return _tiny("wav2vec2")


def tiny_hubert() -> EncoderConfig:
    return _tiny("hubert")


def tiny_wavlm() -> EncoderConfig:
    return _tiny("wavlm", relative_position=True, num_buckets=64, max_distance=200)


def tiny_bestrq() -> EncoderConfig:
    return _tiny("bestrq", frontend="fbank", conv_layers=[[128, 3, 2], [128, 3, 2]], conv_bias=True,
                 layer_norm_first=True)


def small_hubert() -> EncoderConfig:
    """The small-data recipe's encoder (recipes/ssl/small.sh): the tiny transformer (4 post-LN layers of 256) on
    an fbank front end with one stride-2 conv (20 ms frames, as MelHuBERT) and corpus-level input normalisation,
    so that loudness and the spectral envelope (speaker, prosody) reach the model."""
    return _tiny("hubert", frontend="fbank", conv_layers=[[256, 3, 2]], conv_bias=True, input_norm="global")


PRESETS: dict[str, Callable[[], EncoderConfig]] = {
    f.__name__: f
    for f in (wav2vec2_base, wav2vec2_large, hubert_base, hubert_large, wavlm_base, wavlm_large, bestrq,
              tiny_wav2vec2, tiny_hubert, tiny_wavlm, tiny_bestrq, small_hubert)
}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str | os.PathLike) -> EncoderConfig:
    """A preset by name (``hubert_base``), or a YAML file (``conf/model/tiny_hubert.yaml``) holding the dict."""
    s = str(name)
    if s in PRESETS:
        return PRESETS[s]()
    p = Path(s)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        with open(p) as f:
            data = yaml.safe_load(f)
        if not isinstance(data, dict):
            raise ConfigError(f"model config {p} must hold a mapping of EncoderConfig keys")
        return EncoderConfig.from_dict(data)
    close = difflib.get_close_matches(s, list(PRESETS), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known presets: {', '.join(list_presets())}"
    raise KeyError(f"unknown encoder preset or config file '{s}'" + hint)
