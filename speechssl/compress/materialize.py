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
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

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


@torch.no_grad()
def materialize(encoder: nn.Module, gates) -> nn.Module:
    """Build the pruned dense encoder equal to ``encoder(..., gates=gates)``.

    Args:
        encoder: an ``Encoder`` (possibly already pruned: its current units are what the gates index).
        gates: an ``EncoderGates`` with hard values; None fields mean "keep everything at 1".
    Returns:
        a new ``Encoder`` in eval mode (float32 weights on CPU).
    """
    from speechssl.models.encoder import build_encoder

    cfg = encoder.config
    sd = {k: v.detach().float().cpu().clone() for k, v in encoder.state_dict().items()}
    new = dict(sd)
    units = encoder.prunable_units()
    L = cfg.num_layers

    # ---- front-end conv channels
    conv_layers = [list(map(int, c)) for c in cfg.conv_layers]
    conv_g = gates.conv if gates.conv is not None else [None] * len(conv_layers)
    if len(conv_g) != len(conv_layers):
        raise ValueError(f"gates.conv has {len(conv_g)} entries for {len(conv_layers)} conv blocks")
    norm_layer = cfg.frontend == "cnn" and cfg.extractor_mode == "layer_norm"
    for i, g in enumerate(conv_g):
        idx, val = kept_indices(g, conv_layers[i][0])
        if g is None or (len(idx) == conv_layers[i][0] and torch.all(val == 1)):
            continue
        if len(idx) == 0:
            raise ValueError(f"conv block {i} would keep no channel")
        last = i == len(conv_layers) - 1
        if norm_layer and len(idx) != conv_layers[i][0]:
            raise ValueError("conv channels of a layer_norm extractor cannot be pruned exactly (LayerNorm over "
                             "channels); leave gates.conv at 1")
        p = f"feature_extractor.conv_layers.{i}"
        new[f"{p}.conv.weight"] = new[f"{p}.conv.weight"][idx]  # its input columns may already be sliced
        for name in (f"{p}.conv.bias", f"{p}.layer_norm.weight", f"{p}.layer_norm.bias"):
            if name in sd:
                new[name] = sd[name][idx]
        if not last:
            q = f"feature_extractor.conv_layers.{i + 1}.conv.weight"
            new[q] = new[q][:, idx] * val[None, :, None]
        else:
            if "feature_projection.layer_norm.weight" in sd:
                if len(idx) != conv_layers[i][0] or not torch.all(val == 1):
                    raise ValueError("the last conv block feeds a LayerNorm over channels: its gates must stay 1")
            w = "feature_projection.projection.weight"
            new[w] = sd[w][:, idx] * val[None, :]
        conv_layers[i][0] = len(idx)

    # ---- transformer layers
    layer_heads: list[list[int]] = []
    layer_ffn: list[int] = []
    for l in range(L):
        p = f"layers.{l}"
        orig_heads = cfg.heads_of(l)
        H = units["heads"][l]
        dh = cfg.hidden_size // cfg.num_heads
        hg = gates.heads[l] if gates.heads is not None else None
        a = _scalar(gates.attn[l]) if gates.attn is not None else 1.0
        idx, val = kept_indices(hg, H) if H else (torch.zeros(0, dtype=torch.long), torch.zeros(0))
        if H == 0 or a == 0.0 or len(idx) == 0:
            layer_heads.append([])
            for k in list(new):
                if k.startswith(f"{p}.attention."):
                    del new[k]
        else:
            layer_heads.append([orig_heads[int(h)] for h in idx])
            inner = H * dh
            # qkv rows are [q heads | k heads | v heads]; keep the same order for the kept heads
            rows = torch.cat([torch.cat([s * inner + int(h) * dh + torch.arange(dh) for h in idx]) for s in range(3)])
            new[f"{p}.attention.qkv.weight"] = sd[f"{p}.attention.qkv.weight"][rows]
            new[f"{p}.attention.qkv.bias"] = sd[f"{p}.attention.qkv.bias"][rows]
            cols = torch.cat([int(h) * dh + torch.arange(dh) for h in idx])
            col_scale = torch.repeat_interleave(val, dh)
            new[f"{p}.attention.out_proj.weight"] = sd[f"{p}.attention.out_proj.weight"][:, cols] * col_scale[None] * a
            new[f"{p}.attention.out_proj.bias"] = sd[f"{p}.attention.out_proj.bias"] * a
            if f"{p}.attention.gru_rel_pos_const" in sd:
                new[f"{p}.attention.gru_rel_pos_const"] = sd[f"{p}.attention.gru_rel_pos_const"][idx]

        Fw = units["ffn_units"][l]
        ug = gates.ffn_units[l] if gates.ffn_units is not None else None
        b = _scalar(gates.ffn[l]) if gates.ffn is not None else 1.0
        idx, val = kept_indices(ug, Fw) if Fw else (torch.zeros(0, dtype=torch.long), torch.zeros(0))
        if Fw == 0 or b == 0.0 or len(idx) == 0:
            layer_ffn.append(0)
            for k in list(new):
                if k.startswith(f"{p}.feed_forward."):
                    del new[k]
        else:
            layer_ffn.append(len(idx))
            q = f"{p}.feed_forward"
            new[f"{q}.intermediate_dense.weight"] = sd[f"{q}.intermediate_dense.weight"][idx]
            new[f"{q}.intermediate_dense.bias"] = sd[f"{q}.intermediate_dense.bias"][idx]
            new[f"{q}.output_dense.weight"] = sd[f"{q}.output_dense.weight"][:, idx] * val[None] * b
            new[f"{q}.output_dense.bias"] = sd[f"{q}.output_dense.bias"] * b

    new_cfg = dataclasses.replace(cfg, conv_layers=conv_layers, layer_heads=layer_heads, layer_ffn_dims=layer_ffn)
    pruned = build_encoder(new_cfg)
    missing, unexpected = pruned.load_state_dict(new, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"materialised weights do not fit the pruned config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return pruned.eval()
