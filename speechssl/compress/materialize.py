"""Turn a gated encoder into a smaller dense one with the same outputs.

Given hard gate values (exact zeros for dropped units, any value for kept ones, e.g. the deterministic
HardConcrete masks), `materialize` slices the kept rows/columns out of every weight, folds the kept gates' soft
values into the weights that consume the gated activations, and drops attention/FFN blocks whose block gate is 0
(or that kept no unit). The result is a plain ``Encoder`` whose config records the per-layer sizes
(``conv_layers`` channels, ``layer_heads`` as ORIGINAL head indices, ``layer_ffn_dims``), so it saves, loads
strictly and runs anywhere an encoder does.

Folding (g = gate values of kept units, a/b = block gates):
  conv block i channels -> next conv's input columns x g (or the feature projection's, when it has no LayerNorm)
  heads -> out_proj columns x g;  attention block -> out_proj rows and bias x a
  FFN units -> output_dense columns x g;  FFN block -> output_dense rows and bias x b
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from speechssl.models.encoder import build_encoder

__all__ = ["materialize", "kept_indices"]


def kept_indices(gate: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of non-zero gates [k], their values [k]); a None gate keeps all n units at 1."""
    if gate is None:
        return torch.arange(n), torch.ones(n)
    g = gate.detach().float().cpu().reshape(-1)
    if g.numel() != n:
        raise ValueError(f"gate has {g.numel()} values for a group of {n} units")
    idx = torch.nonzero(g != 0).reshape(-1)
    return idx, g[idx]


def _scalar(g) -> float:
    if g is None:
        return 1.0
    return float(torch.as_tensor(g).detach().float().reshape(-1)[0])


def _layer_gate(gates, i: int):
    """Entry ``i`` of a per-layer gate list (None: the list is absent)."""
    return None if gates is None else gates[i]


def _kept_or_none(gate, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kept_indices`, or nothing kept for an already removed group (``n == 0``)."""
    return kept_indices(gate, n) if n else (torch.zeros(0, dtype=torch.long), torch.zeros(0))


def _drop_block(new: dict, prefix: str) -> None:
    for k in [k for k in new if k.startswith(prefix)]:
        del new[k]


def _slice_conv(cfg, sd: dict, new: dict, conv_gates) -> list[list[int]]:
    """Slice the front-end conv channels in ``new``, folding kept gate values into the consumer's input columns;
    returns the new ``conv_layers``."""
    conv_layers = [list(map(int, c)) for c in cfg.conv_layers]
    conv_g = conv_gates if conv_gates is not None else [None] * len(conv_layers)
    if len(conv_g) != len(conv_layers):
        raise ValueError(f"gates.conv has {len(conv_g)} entries for {len(conv_layers)} conv blocks")
    norm_layer = cfg.frontend == "cnn" and cfg.extractor_mode == "layer_norm"
    for i, g in enumerate(conv_g):
        idx, val = kept_indices(g, conv_layers[i][0])
        if g is None or (len(idx) == conv_layers[i][0] and torch.all(val == 1)):
            continue
        if len(idx) == 0:
            raise ValueError(f"conv block {i} would keep no channel")
        if norm_layer and len(idx) != conv_layers[i][0]:
            raise ValueError("conv channels of a layer_norm extractor cannot be pruned exactly (LayerNorm over "
                             "channels); leave gates.conv at 1")
        p = f"feature_extractor.conv_layers.{i}"
        new[f"{p}.conv.weight"] = new[f"{p}.conv.weight"][idx]  # its input columns may already be sliced
        for name in (f"{p}.conv.bias", f"{p}.layer_norm.weight", f"{p}.layer_norm.bias"):
            if name in sd:
                new[name] = sd[name][idx]
        if i < len(conv_layers) - 1:
            q = f"feature_extractor.conv_layers.{i + 1}.conv.weight"
            new[q] = new[q][:, idx] * val[None, :, None]
        else:
            if "feature_projection.layer_norm.weight" in sd:
                if len(idx) != conv_layers[i][0] or not torch.all(val == 1):
                    raise ValueError("the last conv block feeds a LayerNorm over channels: its gates must stay 1")
            w = "feature_projection.projection.weight"
            new[w] = sd[w][:, idx] * val[None, :]
        conv_layers[i][0] = len(idx)
    return conv_layers


def _slice_attention(cfg, sd: dict, new: dict, l: int, num_heads: int, head_gate, block_gate) -> list[int]:
    """Keep layer ``l``'s heads with non-zero gates (folded into out_proj columns, the block gate into its rows
    and bias) or drop the block; returns the kept ORIGINAL head indices ([] = no attention)."""
    p = f"layers.{l}.attention"
    a = _scalar(block_gate)
    idx, val = _kept_or_none(head_gate, num_heads)
    if num_heads == 0 or a == 0.0 or len(idx) == 0:
        _drop_block(new, p + ".")
        return []
    dh = cfg.hidden_size // cfg.num_heads
    inner = num_heads * dh
    # qkv rows are [q heads | k heads | v heads]; keep the same order for the kept heads
    rows = torch.cat([torch.cat([s * inner + int(h) * dh + torch.arange(dh) for h in idx]) for s in range(3)])
    new[f"{p}.qkv.weight"] = sd[f"{p}.qkv.weight"][rows]
    new[f"{p}.qkv.bias"] = sd[f"{p}.qkv.bias"][rows]
    cols = torch.cat([int(h) * dh + torch.arange(dh) for h in idx])
    col_scale = torch.repeat_interleave(val, dh)
    new[f"{p}.out_proj.weight"] = sd[f"{p}.out_proj.weight"][:, cols] * col_scale[None] * a
    new[f"{p}.out_proj.bias"] = sd[f"{p}.out_proj.bias"] * a
    if f"{p}.gru_rel_pos_const" in sd:
        new[f"{p}.gru_rel_pos_const"] = sd[f"{p}.gru_rel_pos_const"][idx]
    orig_heads = cfg.heads_of(l)
    return [orig_heads[int(h)] for h in idx]


def _slice_ffn(sd: dict, new: dict, l: int, width: int, unit_gate, block_gate) -> int:
    """Keep layer ``l``'s FFN units with non-zero gates (folded into output_dense columns, the block gate into its
    rows and bias) or drop the block; returns the kept width (0 = no FFN)."""
    q = f"layers.{l}.feed_forward"
    b = _scalar(block_gate)
    idx, val = _kept_or_none(unit_gate, width)
    if width == 0 or b == 0.0 or len(idx) == 0:
        _drop_block(new, q + ".")
        return 0
    new[f"{q}.intermediate_dense.weight"] = sd[f"{q}.intermediate_dense.weight"][idx]
    new[f"{q}.intermediate_dense.bias"] = sd[f"{q}.intermediate_dense.bias"][idx]
    new[f"{q}.output_dense.weight"] = sd[f"{q}.output_dense.weight"][:, idx] * val[None] * b
    new[f"{q}.output_dense.bias"] = sd[f"{q}.output_dense.bias"] * b
    return len(idx)


@torch.no_grad()
def materialize(encoder: nn.Module, gates) -> nn.Module:
    """Build the pruned dense encoder equal to ``encoder(..., gates=gates)``.

    Args:
        encoder: an ``Encoder`` (possibly already pruned: its current units are what the gates index).
        gates: an ``EncoderGates`` with hard values; None fields mean "keep everything at 1".
    Returns:
        a new ``Encoder`` in eval mode (float32 weights on CPU).
    """
    cfg = encoder.config
    sd = {k: v.detach().float().cpu().clone() for k, v in encoder.state_dict().items()}
    new = dict(sd)
    units = encoder.prunable_units()
    conv_layers = _slice_conv(cfg, sd, new, gates.conv)
    layer_heads = [_slice_attention(cfg, sd, new, l, units["heads"][l], _layer_gate(gates.heads, l),
                                    _layer_gate(gates.attn, l)) for l in range(cfg.num_layers)]
    layer_ffn = [_slice_ffn(sd, new, l, units["ffn_units"][l], _layer_gate(gates.ffn_units, l),
                            _layer_gate(gates.ffn, l)) for l in range(cfg.num_layers)]
    new_cfg = dataclasses.replace(cfg, conv_layers=conv_layers, layer_heads=layer_heads, layer_ffn_dims=layer_ffn)
    pruned = build_encoder(new_cfg)
    missing, unexpected = pruned.load_state_dict(new, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"materialised weights do not fit the pruned config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return pruned.eval()
