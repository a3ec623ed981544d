"""The stack-neutral boundaries a trace records, in forward order: one list for every stack.

    embed, then per layer i: layers.{i}.<kind> for kind in LAYER_KINDS, then norm, logits

Canonical layout (Meta's), per token t of one sequence (batch dim dropped, sequences concatenated):
    embed, attn_norm, attn_out, mlp_norm, mlp_out, out, norm   [T, dim]
    q                                                          [T, n_heads, head_dim]  after rotary, Meta's
    k, v                                                       [T, n_kv_heads, head_dim]  interleaved pairs
    attn_ctx   attention output before the output projection   [T, n_heads * head_dim]  heads concatenated
    mlp_act    silu(gate) * up, before the down projection     [T, ffn_dim]
    logits                                                     [T, vocab]  true vocab (padding cut)
"""

from __future__ import annotations

BEFORE = ["embed"]
LAYER_KINDS = ["attn_norm", "q", "k", "v", "attn_ctx", "attn_out", "mlp_norm", "mlp_act", "mlp_out", "out"]
AFTER = ["norm", "logits"]
KINDS = BEFORE + LAYER_KINDS + AFTER  # every kind of boundary, in forward order


def boundary_names(n_layers: int) -> list[str]:
    return BEFORE + [f"layers.{i}.{k}" for i in range(n_layers) for k in LAYER_KINDS] + AFTER


def parse(name: str) -> tuple[int | None, str]:
    """'layers.3.attn_out' -> (3, 'attn_out'); 'norm' -> (None, 'norm')."""
    if name.startswith("layers."):
        _, i, kind = name.split(".", 2)
        return int(i), kind
    return None, name
