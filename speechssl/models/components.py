"""Building blocks of the encoder family: front ends, positional convolution, attention, feed-forward, layers.

Everything here is plain torch. Parameter layouts are chosen so that Hugging Face / fairseq checkpoints map onto
them by renaming and concatenation only (see ``speechssl/models/convert_hf.py``):

- attention projections are one fused ``qkv`` Linear whose output rows are ``[q heads | k heads | v heads]``,
  each block ``heads * head_dim`` rows with one head's ``head_dim`` rows contiguous (HF's q_proj/k_proj/v_proj
  stacked in that order);
- the positional convolution keeps weight norm as explicit ``weight_g`` [1, 1, K] / ``weight_v`` [C, C/G, K];
- WavLM's relative-position embedding lives in the encoder (``RelativePositionBias``), computed once per forward
  for all ORIGINAL heads; each layer selects its kept heads (``head_index``) so pruned models stay exact.

Shapes: B batch, T samples or frames, D hidden size, H heads in a layer, Dh head dim, F FFN width, C channels.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.constants import SAMPLE_RATE

from .encoder_config import ExtractorMode, InputNorm
from .frames import FBANK_HOP

__all__ = [
    "GradMultiply",
    "ConvFeatureExtractor",
    "FbankFrontend",
    "log_mel_fbank",
    "FeatureProjection",
    "PositionalConv",
    "RelativePositionBias",
    "relative_position_buckets",
    "SelfAttention",
    "ReusedAttention",
    "FeedForward",
    "TransformerLayer",
]


class GradMultiply(torch.autograd.Function):
    """Identity forward, gradient scaled by ``scale`` backward (fairseq's feature_grad_mult)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


class ConvBlock(nn.Module):
    """Conv1d -> (GroupNorm | LayerNorm over channels | nothing) -> GELU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, bias: bool, norm: str, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=bias, padding=padding)
        if norm == "group":
            self.layer_norm: Optional[nn.Module] = nn.GroupNorm(c_out, c_out, affine=True)
        elif norm == "layer":
            self.layer_norm = nn.LayerNorm(c_out, elementwise_affine=True)
        else:
            self.layer_norm = None
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C_in, T] -> [B, C_out, T']."""
        x = self.conv(x)
        if self.norm == "layer":
            x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        elif self.norm == "group" and torch.jit.is_tracing():
            x = _group_norm_for_export(x, self.layer_norm)
        elif self.norm == "group":
            x = self.layer_norm(x)
        return F.gelu(x)


def _group_norm_for_export(x: Tensor, norm: nn.GroupNorm) -> Tensor:
    """``norm`` (GroupNorm with one channel per group) as traced for ONNX: x [B, C, T] -> [B, C, T], statistics
    over time in float64. onnxruntime's InstanceNormalization and float32 ReduceMean sum the long time axis of a
    padded batch with errors near 3e-4 (torch's kernel stays near 3e-6); in float64 the graph matches torch."""
    x64 = x.double()
    mean = x64.mean(-1, keepdim=True)
    var = (x64 - mean).pow(2).mean(-1, keepdim=True)
    y = ((x64 - mean) * torch.rsqrt(var + norm.eps)).to(x.dtype)
    return y * norm.weight[:, None] + norm.bias[:, None]


def _gated_blocks(blocks: nn.ModuleList, x: Tensor, gates: Optional[Sequence[Tensor]]) -> Tensor:
    """Conv blocks in order on x [B, C, T]; gates[i] [C_i] (None: no gate) multiplies block i's output channels."""
    for i, block in enumerate(blocks):
        x = block(x)
        if gates is not None and gates[i] is not None:
            x = x * gates[i].to(x.dtype)[:, None]
    return x


class ConvFeatureExtractor(nn.Module):
    """Waveform CNN (wav2vec 2.0 style): 7 strided convs, 320x downsampling for the Base layout.

    mode "group_norm": GroupNorm(C, C) after the first conv only (Base); "layer_norm": LayerNorm in every block
    (Large). ``conv_layers`` may give different channel counts per layer (pruned models).
    """

    def __init__(self, conv_layers: Sequence[Sequence[int]], mode: ExtractorMode = "group_norm", bias: bool = False):
        super().__init__()
        blocks = []
        c_in = 1
        for i, (c, k, s) in enumerate(conv_layers):
            norm = "layer" if mode == "layer_norm" else ("group" if i == 0 else "none")
            blocks.append(ConvBlock(c_in, c, k, s, bias, norm))
            c_in = c
        self.conv_layers = nn.ModuleList(blocks)
        self.layers = [list(map(int, l)) for l in conv_layers]

    def forward(self, wav: Tensor, gates: Optional[Sequence[Tensor]] = None) -> Tensor:
        """wav: [B, T] -> features [B, C_last, T']; gates[i]: [C_i] multiplies block i's output channels."""
        return _gated_blocks(self.conv_layers, wav.unsqueeze(1), gates)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float = 20.0, f_max: Optional[float] = None
                   ) -> Tensor:
    """Triangular HTK-mel filters: [n_fft // 2 + 1, n_mels]."""
    f_max = f_max or sample_rate / 2

    def hz2mel(f):
        return 1127.0 * math.log(1.0 + f / 700.0)

    mels = torch.linspace(hz2mel(f_min), hz2mel(f_max), n_mels + 2, dtype=torch.float64)
    hz = 700.0 * (torch.exp(mels / 1127.0) - 1.0)
    bins = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lo, mid, hi = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    up = (bins[None] - lo) / (mid - lo)
    down = (hi - bins[None]) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0).T.float()


def log_mel_fbank(wav: Tensor, n_mels: int = 80, sample_rate: int = SAMPLE_RATE, win: int = 400,
                  hop: int = FBANK_HOP, n_fft: int = 512, filters: Optional[Tensor] = None) -> Tensor:
    """Log-mel filterbank of a padded batch: [B, T] -> [B, T // hop, n_mels] (25 ms Hann windows, 10 ms hop,
    centred by zero padding (win - hop) / 2 on each side so that frame i covers samples around i * hop)."""
    pad = (win - hop) // 2
    x = F.pad(wav.float(), (pad, pad))
    if torch.jit.is_tracing():  # ONNX export: neither unfold over a dynamic length nor rfft exports
        spec = _power_spectrum_by_conv(x, win, hop, n_fft)
    else:
        frames = x.unfold(-1, win, hop)  # [B, N, win]
        frames = frames - frames.mean(-1, keepdim=True)  # remove DC per frame, as Kaldi does
        window = torch.hann_window(win, periodic=False, device=wav.device)
        spec = torch.fft.rfft(frames * window, n=n_fft).abs().pow(2)  # [B, N, n_fft/2+1]
    if filters is None:
        filters = mel_filterbank(n_fft, n_mels, sample_rate).to(wav.device)
    mel = spec @ filters
    n = wav.shape[-1] // hop
    return mel[:, :n].clamp_min(1e-10).log()


def _power_spectrum_by_conv(x: Tensor, win: int, hop: int, n_fft: int) -> Tensor:
    """What :func:`log_mel_fbank` computes by unfold and rfft, as one strided Conv1d: x [B, T] (padded) ->
    power spectrum [B, N, n_fft // 2 + 1]. The kernel folds the per-frame DC removal, the Hann window and the
    real DFT (cosine and sine rows), built in float64; outputs agree with the FFT path to float32 rounding."""
    n = torch.arange(win, dtype=torch.float64)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
    window = torch.hann_window(win, periodic=False, dtype=torch.float64)
    angle = 2 * math.pi * k[:, None] * n[None] / n_fft  # [K, win]
    basis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * window  # [2K, win]: DFT of the windowed frame
    basis = basis - basis.mean(-1, keepdim=True)  # DFT(w * (f - mean f)) = (basis - row mean) . f
    y = F.conv1d(x.unsqueeze(1), basis.to(x.dtype).unsqueeze(1), stride=hop)  # [B, 2K, N]
    re, im = y.chunk(2, dim=1)
    return (re * re + im * im).transpose(1, 2)


class FbankFrontend(nn.Module):
    """80-dim log-mel -> mean/variance normalisation -> small conv subsampler (Fast-HuBERT style).

    ``conv_layers`` [[C, k, s], ...] are Conv1d over time (padding k // 2) + GELU; strides 2, 2 give 40 ms frames,
    one stride 2 gives 20 ms frames (MelHuBERT). ``input_norm`` chooses the normalisation:

    - ``"utterance"``: per utterance and bin, over its valid frames. Removes loudness and the long-term spectral
      envelope, which carry much of a speaker's identity and of prosody.
    - ``"global"``: one mean and standard deviation per bin for the whole corpus (buffers ``input_mean`` /
      ``input_std`` [n_mels], saved with the weights; :meth:`set_input_stats` fills them before training), so the
      model sees loudness and spectral envelope as they are.
    """

    def __init__(self, conv_layers: Sequence[Sequence[int]], n_mels: int = 80, bias: bool = True,
                 input_norm: InputNorm = "utterance"):
        super().__init__()
        self.n_mels, self.input_norm = n_mels, input_norm
        blocks = []
        c_in = n_mels
        for c, k, s in conv_layers:
            blocks.append(ConvBlock(c_in, c, k, s, bias, "none", padding=k // 2))
            c_in = c
        self.conv_layers = nn.ModuleList(blocks)
        self.layers = [list(map(int, l)) for l in conv_layers]
        self.register_buffer("mel_filters", mel_filterbank(512, n_mels, SAMPLE_RATE), persistent=False)
        if input_norm == "global":
            self.register_buffer("input_mean", torch.zeros(n_mels))
            self.register_buffer("input_std", torch.ones(n_mels))

    @torch.no_grad()
    def set_input_stats(self, mean: Tensor, std: Tensor) -> None:
        """Corpus statistics for ``input_norm: global``: mean, std [n_mels] of the raw log-mel frames."""
        if self.input_norm != "global":
            raise ValueError("set_input_stats is for encoder config input_norm 'global'")
        self.input_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.input_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-3))

    def apply_norm(self, feats: Tensor, lengths: Optional[Tensor]) -> Tensor:
        """The configured normalisation of raw log-mel frames [B, N, M] -> [B, N, M] (padding set to 0)."""
        if self.input_norm == "utterance":
            return self.normalize(feats, lengths)
        x = (feats - self.input_mean) / self.input_std
        if lengths is None:
            return x
        return x * (torch.arange(feats.shape[1], device=feats.device)[None] < lengths[:, None]).unsqueeze(-1)

    @staticmethod
    def normalize(feats: Tensor, lengths: Optional[Tensor]) -> Tensor:
        """Per-utterance, per-bin zero mean / unit variance over valid frames; padding set to 0. [B, N, M]."""
        if lengths is None:
            mean = feats.mean(1, keepdim=True)
            var = feats.var(1, unbiased=False, keepdim=True)
            return (feats - mean) / (var + 1e-5).sqrt()
        valid = (torch.arange(feats.shape[1], device=feats.device)[None] < lengths[:, None]).unsqueeze(-1)
        cnt = valid.sum(1, keepdim=True).clamp_min(1).to(feats.dtype)
        mean = (feats * valid).sum(1, keepdim=True) / cnt
        var = (((feats - mean) * valid) ** 2).sum(1, keepdim=True) / cnt
        return ((feats - mean) / (var + 1e-5).sqrt()) * valid

    def forward(self, feats: Tensor, gates: Optional[Sequence[Tensor]] = None) -> Tensor:
        """feats: normalised [B, N, n_mels] -> [B, C_last, N'] with N' = ceil(N / prod(strides))."""
        return _gated_blocks(self.conv_layers, feats.transpose(1, 2), gates)


class FeatureProjection(nn.Module):
    """(LayerNorm over C) -> Linear(C -> D) -> dropout; returns the projected and the normalised features."""

    def __init__(self, c: int, d: int, layer_norm: bool = True, dropout: float = 0.0, eps: float = 1e-5):
        super().__init__()
        self.layer_norm = nn.LayerNorm(c, eps=eps) if layer_norm else None
        self.projection = nn.Linear(c, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [B, T, C] -> ([B, T, D], [B, T, C])."""
        normed = self.layer_norm(x) if self.layer_norm is not None else x
        return self.dropout(self.projection(normed)), normed


class PositionalConv(nn.Module):
    """Grouped Conv1d(D, D, K, padding K // 2) with weight norm over dim 2, drop the last frame for even K, GELU."""

    def __init__(self, d: int, kernel: int = 128, groups: int = 16):
        super().__init__()
        if d % groups:
            raise ValueError(f"hidden_size {d} must be divisible by conv_pos_groups {groups}")
        self.kernel, self.groups = kernel, groups
        v = torch.empty(d, d // groups, kernel)
        nn.init.normal_(v, mean=0.0, std=math.sqrt(4.0 / (kernel * d)))
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.linalg.vector_norm(v, dim=(0, 1), keepdim=True))
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, T, D] -> [B, T, D] (the positional term, to be added to x)."""
        w = torch._weight_norm(self.weight_v, self.weight_g, 2)
        y = F.conv1d(x.transpose(1, 2), w, self.bias, padding=self.kernel // 2, groups=self.groups)
        if self.kernel % 2 == 0:
            y = y[:, :, :-1]
        return F.gelu(y).transpose(1, 2)


def relative_position_buckets(relative: Tensor, num_buckets: int = 320, max_distance: int = 800) -> Tensor:
    """T5-style bidirectional log buckets of ``key - query`` offsets (WavLM).

    Half the buckets per direction (positive offsets get the upper half); offsets below num_buckets // 4 are
    exact, larger ones are log-spaced up to max_distance, beyond it they share the last bucket.
    """
    half = num_buckets // 2
    buckets = (relative > 0).long() * half
    rel = relative.abs()
    max_exact = half // 2
    is_small = rel < max_exact
    large = max_exact + (
        torch.log(rel.float().clamp_min(1) / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    ).long()
    large = large.clamp_max(half - 1)
    return buckets + torch.where(is_small, rel, large)


class RelativePositionBias(nn.Module):
    """WavLM's bucketed relative-position embedding for all original heads: ``bias(T)`` -> [H, T, T]."""

    def __init__(self, num_heads: int, num_buckets: int = 320, max_distance: int = 800):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.rel_attn_embed = nn.Embedding(num_buckets, num_heads)

    def forward(self, length: int) -> Tensor:
        pos = torch.arange(length, device=self.rel_attn_embed.weight.device)
        buckets = relative_position_buckets(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        return self.rel_attn_embed(buckets).permute(2, 0, 1)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection, SDPA kernels and optional WavLM gated bias.

    ``head_index`` lists the ORIGINAL head indices this layer keeps (pruning); the WavLM gate of head h reads the
    input slice of original head h, and the position bias row h, so pruned layers stay exact.
    """

    #: CPU only: with a trainable float bias, attend by baddbmm -> softmax -> bmm instead of SDPA (faster there).
    cpu_bias_by_bmm: bool = True

    def __init__(self, d: int, num_heads: int, head_index: Sequence[int], dropout: float = 0.0,
                 gated_relative_bias: bool = False):
        super().__init__()
        self._init_sizes(d, num_heads, head_index, dropout)
        inner = self.heads * self.head_dim
        self.qkv = nn.Linear(d, 3 * inner)
        self.out_proj = nn.Linear(inner, d)
        self.gated = gated_relative_bias
        if gated_relative_bias:
            self.gru_rel_pos_linear = nn.Linear(self.head_dim, 8)
            self.gru_rel_pos_const = nn.Parameter(torch.ones(self.heads))

    def _init_sizes(self, d: int, num_heads: int, head_index: Sequence[int], dropout: float) -> None:
        if d % num_heads:
            raise ValueError(f"hidden_size {d} must be divisible by num_heads {num_heads}")
        self.d, self.num_orig_heads = d, num_heads
        self.head_dim = d // num_heads
        self.heads = len(head_index)
        self.register_buffer("head_index", torch.tensor(list(head_index), dtype=torch.long), persistent=False)
        self.all_heads = list(head_index) == list(range(num_heads))
        self.dropout = dropout

    def gated_bias(self, x: Tensor, bias: Tensor) -> Tensor:
        """WavLM gate: x [B, T, D], bias [H_orig, T, T] -> [B, H, T, T].

        gate_h = a * (b * c_h - 1) + 2 with (a, b) = sigmoid of two sums of 4 outputs of Linear(Dh -> 8) on the
        head's input slice; the 8 -> 2 sum is folded into the weights (one small matmul instead of two ops).
        """
        B, T, _ = x.shape
        xh = x.view(B, T, self.num_orig_heads, self.head_dim)
        if not self.all_heads:
            xh = xh.index_select(2, self.head_index)
            bias = bias.index_select(0, self.head_index)
        w = self.gru_rel_pos_linear.weight.view(2, 4, self.head_dim).sum(1)
        b = self.gru_rel_pos_linear.bias.view(2, 4).sum(1)
        ab = torch.sigmoid(F.linear(xh, w, b))  # [B, T, H, 2]
        gate = ab[..., 0] * (ab[..., 1] * self.gru_rel_pos_const - 1.0) + 2.0  # [B, T, H]
        # contiguous: the product inherits the gate's [B, T, H] layout, and CUDA's SDPA then falls back to its
        # math path instead of the memory-efficient kernel (measured on an H200: 11-15% of a WavLM step)
        return (gate.transpose(1, 2).unsqueeze(-1) * bias.unsqueeze(0)).contiguous()

    def forward(self, x: Tensor, key_mask: Optional[Tensor] = None, position_bias: Optional[Tensor] = None,
                head_gate: Optional[Tensor] = None, output_attentions: bool = False
                ) -> tuple[Tensor, Optional[Tensor]]:
        """x: [B, T, D]; key_mask: bool [B, T] True = valid key (None: all valid); position_bias [H_orig, T, T].

        Returns ([B, T, D], attention probabilities [B, H, T, T] or None). ``output_attentions`` also serves a
        layer whose map a later ``ReusedAttention`` applies (the probabilities are needed, so SDPA is skipped).
        """
        B, T, _ = x.shape
        H, Dh = self.heads, self.head_dim
        q, k, v = self.qkv(x).view(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, Dh]
        mask: Optional[Tensor] = None
        if self.gated and position_bias is not None:
            mask = self.gated_bias(x, position_bias)
            if key_mask is not None:
                mask = mask.masked_fill(~key_mask[:, None, None, :], float("-inf"))
            mask = mask.to(q.dtype)
        elif key_mask is not None:
            mask = key_mask[:, None, None, :]
        p = self.dropout if self.training else 0.0
        probs = None
        # On CPU a trainable float bias (WavLM in training) sends SDPA to its generic math path with extra -inf
        # bookkeeping; one baddbmm (bias + scaled QK^T) -> softmax -> bmm is the same math with fewer passes.
        # On CUDA SDPA's memory-efficient kernel takes the bias and returns its gradient, so it stays on SDPA.
        trainable_bias = (mask is not None and mask.dtype != torch.bool and mask.requires_grad
                          and q.device.type == "cpu" and self.cpu_bias_by_bmm)
        if output_attentions or (trainable_bias and torch.is_grad_enabled()):
            if mask is None or mask.dtype == torch.bool:
                base = torch.zeros(B * H, T, T, dtype=q.dtype, device=q.device)
                if mask is not None:
                    base = base.view(B, H, T, T).masked_fill(~mask, float("-inf")).view(B * H, T, T)
            else:
                base = mask.reshape(B * H, T, T)
            scores = torch.baddbmm(base, q.reshape(B * H, T, Dh), k.reshape(B * H, T, Dh).transpose(1, 2),
                                   alpha=Dh ** -0.5)
            attn = scores.softmax(-1)
            out = torch.bmm(F.dropout(attn, p, self.training), v.reshape(B * H, T, Dh)).view(B, H, T, Dh)
            probs = attn.view(B, H, T, T) if output_attentions else None
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = out.transpose(1, 2)  # [B, T, H, Dh]
        if head_gate is not None:
            out = out * head_gate.to(out.dtype)[:, None]
        return self.out_proj(out.reshape(B, T, H * Dh)), probs


class ReusedAttention(SelfAttention):
    """Attention that applies an earlier layer's attention map to its own values (Recycle-and-Distill).

    It has no query/key projections (and no WavLM gate, which only shapes a map it does not compute): ``v_proj``
    (D -> H*Dh) and ``out_proj`` only. The map's masked keys already carry probability 0.
    """

    def __init__(self, d: int, num_heads: int, head_index: Sequence[int], dropout: float = 0.0):
        nn.Module.__init__(self)
        self._init_sizes(d, num_heads, head_index, dropout)
        inner = self.heads * self.head_dim
        self.v_proj = nn.Linear(d, inner)
        self.out_proj = nn.Linear(inner, d)
        self.gated = False

    def forward(self, x: Tensor, key_mask: Optional[Tensor] = None, position_bias: Optional[Tensor] = None,
                head_gate: Optional[Tensor] = None, output_attentions: bool = False, *,
                attn_map: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """x: [B, T, D]; attn_map: [B, H, T, T] attention probabilities of the reused layer.

        Returns ([B, T, D], the reused map [B, H, T, T] when ``output_attentions``, else None).
        """
        if attn_map is None:
            raise ValueError("a ReusedAttention layer needs the attention map of the layer it reuses (attn_map)")
        B, T, _ = x.shape
        H, Dh = self.heads, self.head_dim
        if attn_map.shape != (B, H, T, T):
            raise ValueError(f"reused attention map {tuple(attn_map.shape)} does not match [B, H, T, T] = "
                             f"{(B, H, T, T)}")
        v = self.v_proj(x).view(B, T, H, Dh).transpose(1, 2)  # [B, H, T, Dh]
        p = self.dropout if self.training else 0.0
        out = torch.matmul(F.dropout(attn_map.to(v.dtype), p, self.training), v).transpose(1, 2)  # [B, T, H, Dh]
        if head_gate is not None:
            out = out * head_gate.to(out.dtype)[:, None]
        return self.out_proj(out.reshape(B, T, H * Dh)), (attn_map if output_attentions else None)


class FeedForward(nn.Module):
    """Linear(D -> F) -> GELU -> dropout -> (unit gates) -> Linear(F -> D) -> dropout."""

    def __init__(self, d: int, ffn_dim: int, activation_dropout: float = 0.0, dropout: float = 0.0):
        super().__init__()
        self.intermediate_dense = nn.Linear(d, ffn_dim)
        self.output_dense = nn.Linear(ffn_dim, d)
        self.intermediate_dropout = nn.Dropout(activation_dropout)
        self.output_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, unit_gate: Optional[Tensor] = None) -> Tensor:
        """x: [B, T, D] -> [B, T, D]; unit_gate: [F]."""
        h = self.intermediate_dropout(F.gelu(self.intermediate_dense(x)))
        if unit_gate is not None:
            h = h * unit_gate.to(h.dtype)
        return self.output_dropout(self.output_dense(h))


class TransformerLayer(nn.Module):
    """Post-LN (Base) or pre-LN (Large) transformer layer; either block may be absent after pruning.

    post-LN: x = LN(x + drop(attn(x))); x = LN_f(x + ffn(x))
    pre-LN:  x = x + drop(attn(LN(x)));  x = x + ffn(LN_f(x))
    Block gates (scalars) multiply a block's output before its residual add.
    """

    def __init__(self, d: int, num_heads: int, head_index: Sequence[int], ffn_dim: int, *, layer_norm_first: bool,
                 dropout: float, attention_dropout: float, activation_dropout: float, gated_relative_bias: bool,
                 eps: float = 1e-5, reuse_attention: bool = False):
        super().__init__()
        self.layer_norm_first = layer_norm_first
        self.attention: Optional[SelfAttention] = None
        if reuse_attention:
            self.attention = ReusedAttention(d, num_heads, head_index, attention_dropout)
        elif len(head_index):
            self.attention = SelfAttention(d, num_heads, head_index, attention_dropout, gated_relative_bias)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d, eps=eps)
        self.feed_forward = FeedForward(d, ffn_dim, activation_dropout, dropout) if ffn_dim > 0 else None
        self.final_layer_norm = nn.LayerNorm(d, eps=eps)

    def forward(self, x: Tensor, key_mask: Optional[Tensor] = None, position_bias: Optional[Tensor] = None, *,
                head_gate: Optional[Tensor] = None, attn_gate: Optional[Tensor] = None,
                ffn_unit_gate: Optional[Tensor] = None, ffn_gate: Optional[Tensor] = None,
                output_attentions: bool = False, attn_map: Optional[Tensor] = None
                ) -> tuple[Tensor, Optional[Tensor]]:
        """x: [B, T, D] -> ([B, T, D], probs [B, H, T, T] or None); attn_map [B, H, T, T]: the reused map of a
        ``ReusedAttention`` layer."""
        probs = None
        if self.layer_norm_first:
            if self.attention is not None:
                a, probs = self._attend(self.layer_norm(x), key_mask, position_bias, head_gate, output_attentions,
                                        attn_map)
                a = self.dropout(a)
                x = x + (a * attn_gate if attn_gate is not None else a)
            if self.feed_forward is not None:
                f = self.feed_forward(self.final_layer_norm(x), ffn_unit_gate)
                x = x + (f * ffn_gate if ffn_gate is not None else f)
            return x, probs
        if self.attention is not None:
            a, probs = self._attend(x, key_mask, position_bias, head_gate, output_attentions, attn_map)
            a = self.dropout(a)
            x = x + (a * attn_gate if attn_gate is not None else a)
        x = self.layer_norm(x)
        if self.feed_forward is not None:
            f = self.feed_forward(x, ffn_unit_gate)
            x = x + (f * ffn_gate if ffn_gate is not None else f)
        return self.final_layer_norm(x), probs

    def _attend(self, x: Tensor, key_mask: Optional[Tensor], position_bias: Optional[Tensor],
                head_gate: Optional[Tensor], output_attentions: bool, attn_map: Optional[Tensor]
                ) -> tuple[Tensor, Optional[Tensor]]:
        if isinstance(self.attention, ReusedAttention):
            return self.attention(x, key_mask, position_bias, head_gate, output_attentions, attn_map=attn_map)
        return self.attention(x, key_mask, position_bias, head_gate, output_attentions)
