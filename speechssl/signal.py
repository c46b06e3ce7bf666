"""A random speaker-identity change of waveforms: formant and pitch shifts that keep the length (so frame labels
stay aligned). Used by the data pipeline (``data.augment.speaker_prob``) and by ContentVec inside its forward."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["speaker_change", "draw_speaker_ratios", "draw_ratio", "SPEAKER_NFFT", "SPEAKER_HOP", "SPEAKER_LIFTER"]

SPEAKER_NFFT = 1024  # 64 ms windows: harmonics 15.6 Hz apart are resolved for voices down to about 60 Hz
SPEAKER_HOP = 128    # 8x overlap keeps the phase vocoder's phase propagation coherent
SPEAKER_LIFTER = 24  # cepstral cut-off in samples (1.5 ms): below the shortest pitch period (about 2.5 ms)


def draw_ratio(u_value: float, u_invert: float, bounds: tuple[float, float]) -> float:
    """A ratio uniform in ``bounds`` (from ``u_value`` in [0, 1)), inverted when ``u_invert`` < 0.5."""
    r = bounds[0] + (bounds[1] - bounds[0]) * u_value
    return 1.0 / r if u_invert < 0.5 else r


def draw_speaker_ratios(n: int, formant_ratio=(1.0, 1.4), pitch_ratio=(1.0, 2.0),
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Formant and pitch ratios [n] each: uniform in the ranges, each inverted with probability 1/2 (NANSY)."""
    u = torch.rand(4, n, generator=generator, dtype=torch.float64)
    out = []
    for (lo, hi), value, invert in ((formant_ratio, u[0], u[1]), (pitch_ratio, u[2], u[3])):
        r = lo + (hi - lo) * value
        out.append(torch.where(invert < 0.5, 1.0 / r, r).float())
    return out[0], out[1]


def _warp_bins(x: Tensor, ratio: Tensor, fill: float | None) -> Tensor:
    """Resample x [B, F, N] along frequency: out[:, k] = x[:, k / ratio] (linear interpolation; ratio [B]).
    Source positions past the last bin take ``fill`` (None: the last bin's value)."""
    B, F, _ = x.shape
    pos = torch.arange(F, device=x.device, dtype=torch.float32)[None] / ratio[:, None].float()  # [B, F]
    lo = pos.floor().clamp(0, F - 1)
    w = (pos - lo).clamp(0, 1)[..., None]
    lo = lo.long()
    hi = (lo + 1).clamp_max(F - 1)
    frames = x.shape[2]
    out = x.gather(1, lo[..., None].expand(-1, -1, frames)) * (1 - w) \
        + x.gather(1, hi[..., None].expand(-1, -1, frames)) * w
    if fill is not None:
        out = out.masked_fill((pos > F - 1)[..., None], fill)
    return out


def _envelope(logmag: Tensor, lifter: int) -> Tensor:
    """Spectral envelope of log magnitudes [B, F, N]: the low-quefrency part (< ``lifter`` samples) of the real
    cepstrum, transformed back."""
    n_fft = 2 * (logmag.shape[1] - 1)
    cep = torch.fft.irfft(logmag, n=n_fft, dim=1)
    keep = torch.zeros(n_fft, device=logmag.device)
    keep[:lifter] = 1.0
    keep[n_fft - lifter + 1:] = 1.0  # the cepstrum of a real spectrum is symmetric
    return torch.fft.rfft(cep * keep[None, :, None], dim=1).real


def _vocoder_phase(phase: Tensor, ratio: Tensor, hop: int) -> Tensor:
    """Phase [B, F, N] of a pitch shift by ``ratio`` [B]: bin k advances each hop by ``ratio`` times the
    instantaneous frequency of its source bin ``round(k / ratio)``; ratio 1 gives back ``phase`` (mod 2 pi)."""
    B, F, N = phase.shape
    n_fft = 2 * (F - 1)
    nominal = 2 * torch.pi * hop * torch.arange(F, device=phase.device, dtype=torch.float64)[None, :, None] / n_fft
    dev = phase[..., 1:].double() - phase[..., :-1].double() - nominal
    advance = nominal + dev - 2 * torch.pi * torch.round(dev / (2 * torch.pi))  # [B, F, N-1] true advance
    src = (torch.arange(F, device=phase.device)[None] / ratio[:, None].double()).round().long().clamp_max(F - 1)
    src3 = src[..., None]
    shifted = advance.gather(1, src3.expand(-1, -1, N - 1)) * ratio.double()[:, None, None]
    start = phase[..., :1].double().gather(1, src3)
    out = torch.cat([start, start + shifted.cumsum(-1)], dim=-1)
    return torch.remainder(out, 2 * torch.pi).float()


@torch.no_grad()
def speaker_change(audio: Tensor, lengths: Tensor, formant: Tensor, pitch: Tensor, *, n_fft: int = SPEAKER_NFFT,
                   hop: int = SPEAKER_HOP, lifter: int = SPEAKER_LIFTER) -> Tensor:
    """Change the speaker identity of a padded batch: audio [B, T] float, lengths [B] samples, formant and pitch
    ratios [B] (> 1 raises) -> [B, T] of the same length, each utterance at its input RMS, padding zero.

    Formants move by ``formant`` (the cepstral envelope resampled along frequency), harmonics by ``pitch``
    (fine structure resampled, phase-vocoder phases); ratios of 1 give the input back up to STFT round-off.
    Runs on the input's device in float32 (autocast off); no gradient.
    """
    B, T = audio.shape
    dev = audio.device
    formant, pitch = formant.to(dev).float(), pitch.to(dev).float()
    if bool((formant <= 0).any()) or bool((pitch <= 0).any()):
        raise ValueError("speaker_change: formant and pitch ratios must be > 0")
    valid = torch.arange(T, device=dev)[None] < lengths.to(dev)[:, None]
    with torch.autocast(device_type=dev.type, enabled=False):
        x = audio.float() * valid
        window = torch.hann_window(n_fft, device=dev)
        spec = torch.stft(x, n_fft, hop, window=window, return_complex=True, pad_mode="constant")  # [B, F, N]
        logmag = spec.abs().clamp_min(1e-7).log()
        env = _envelope(logmag, lifter)
        # harmonics moved in from above the Nyquist frequency do not exist: magnitude exp(-80), i.e. zero
        mag = (_warp_bins(env, formant, None) + _warp_bins(logmag - env, pitch, -80.0)).exp()
        y = torch.istft(torch.polar(mag, _vocoder_phase(spec.angle(), pitch, hop)), n_fft, hop, window=window,
                        length=T) * valid
        rms_in = (x.pow(2).sum(1) / valid.sum(1).clamp_min(1)).sqrt()
        rms_out = (y.pow(2).sum(1) / valid.sum(1).clamp_min(1)).sqrt()
        y = y * (rms_in / rms_out.clamp_min(1e-8))[:, None]
    return y.to(audio.dtype)
