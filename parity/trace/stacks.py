"""Per stack: where each boundary (parity.trace.boundaries) lives in the stack's own model, and how the
tensor found there is brought into the canonical layout. No stack is re-implemented: every boundary is
a tensor the stack computes anyway, read by a forward hook on one of its modules (or, for q and k after
rotary, by wrapping the stack's own rotary function for the duration of a trace).

A row of TRACES per backend name (parity.backends.BACKENDS); a backend without a row cannot be traced.
A plug-in backend can add its row with `register()`.

Layout facts the rows rely on (docs/architecture.md, "Tracing"):
- meta (llama_models): batch-first [B, T, ...]; apply_rotary_emb returns q, k as [B, T, heads, hd] in
  Meta's interleaved pairs; fairscale's column-parallel outputs (wq/wk/wv, w1/w3) and the inputs of the
  row-parallel wo / w2 hold this rank's block of heads / ffn features, in rank order.
- hf (transformers): batch-first; apply_rotary_pos_emb returns q, k as [B, heads, T, hd] in rotate-half
  order (the checkpoint's wq / wk rows were permuted, spec.permute).
- megatron (megatron-core, local spec): sequence-first [T, B, ...]; core_attention receives query
  [T, B, heads, hd], key and value [T, B, kv groups, hd] after rotary (rotate-half) and before the kv
  groups are repeated; linear_proj's and linear_fc2's inputs hold this rank's block of heads / ffn
  features, so gathering them in rank order gives Meta's order (fc1's per-rank [gate; up] split is
  already undone there: the activation is silu(gate_r) * up_r).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from parity.errors import UserError


@dataclass(frozen=True)
class Tap:
    module: str  # path of the module under backend.model ({i} = layer)
    hook: str = "out"  # "out": its output; "in": its input; "call": `function`, called inside the module
    index: int = 0  # which tensor of a tuple (output, positional inputs, or the function's outputs)
    layout: str = "BT"  # the tensor's leading dims: "BT" batch-first, "TB" sequence-first, "BHT" [B, heads, T, hd]
    heads: bool = False  # features are heads of head_dim: canonical [T, heads, hd]
    rotate_half: bool = False  # each head's features in rotate-half order -> Meta's interleaved pairs
    tp_split: bool = False  # a TP rank holds a block of heads / features: gathered on dim 1 in rank order
    function: str | None = None  # hook "call": "module:function" the stack calls by its global name


@dataclass(frozen=True)
class StackTrace:
    layers: str  # path of the list of transformer layers (its length = the number of layers)
    head_dim: Callable  # model -> head_dim
    taps: dict[str, Tap] = field(default_factory=dict)  # boundary kind -> Tap; "logits" = backend.forward()
    fused_norm: tuple[str, ...] = ()  # class names that stand in for a norm fused elsewhere (untraceable)


_META_ROPE = "llama_models.llama3.model:apply_rotary_emb"
_HF_ROPE = "transformers.models.llama.modeling_llama:apply_rotary_pos_emb"
_MG = "decoder.layers.{i}."

TRACES: dict[str, StackTrace] = {
    "meta": StackTrace("layers", lambda m: m.params.dim // m.params.n_heads, {
        "embed": Tap("tok_embeddings"),
        "attn_norm": Tap("layers.{i}.attention_norm"),
        "q": Tap("layers.{i}.attention", "call", 0, heads=True, tp_split=True, function=_META_ROPE),
        "k": Tap("layers.{i}.attention", "call", 1, heads=True, tp_split=True, function=_META_ROPE),
        "v": Tap("layers.{i}.attention.wv", heads=True, tp_split=True),
        "attn_ctx": Tap("layers.{i}.attention.wo", "in", tp_split=True),
        "attn_out": Tap("layers.{i}.attention"),
        "mlp_norm": Tap("layers.{i}.ffn_norm"),
        "mlp_act": Tap("layers.{i}.feed_forward.w2", "in", tp_split=True),
        "mlp_out": Tap("layers.{i}.feed_forward"),
        "out": Tap("layers.{i}"),
        "norm": Tap("norm"),
    }),
    "hf": StackTrace("model.layers", lambda m: m.model.layers[0].self_attn.head_dim, {
        "embed": Tap("model.embed_tokens"),
        "attn_norm": Tap("model.layers.{i}.input_layernorm"),
        "q": Tap("model.layers.{i}.self_attn", "call", 0, "BHT", rotate_half=True, function=_HF_ROPE),
        "k": Tap("model.layers.{i}.self_attn", "call", 1, "BHT", rotate_half=True, function=_HF_ROPE),
        "v": Tap("model.layers.{i}.self_attn.v_proj", heads=True),
        "attn_ctx": Tap("model.layers.{i}.self_attn.o_proj", "in"),
        "attn_out": Tap("model.layers.{i}.self_attn", index=0),
        "mlp_norm": Tap("model.layers.{i}.post_attention_layernorm"),
        "mlp_act": Tap("model.layers.{i}.mlp.down_proj", "in"),
        "mlp_out": Tap("model.layers.{i}.mlp"),
        "out": Tap("model.layers.{i}", index=0),
        "norm": Tap("model.norm"),
    }),
    "megatron": StackTrace("decoder.layers", lambda m: m.config.kv_channels, {
        "embed": Tap("embedding", layout="TB"),
        "attn_norm": Tap(_MG + "input_layernorm", layout="TB"),
        "q": Tap(_MG + "self_attention.core_attention", "in", 0, "TB", rotate_half=True, tp_split=True),
        "k": Tap(_MG + "self_attention.core_attention", "in", 1, "TB", rotate_half=True, tp_split=True),
        "v": Tap(_MG + "self_attention.core_attention", "in", 2, "TB", heads=True, tp_split=True),
        "attn_ctx": Tap(_MG + "self_attention.linear_proj", "in", layout="TB", tp_split=True),
        "attn_out": Tap(_MG + "self_attention", index=0, layout="TB"),
        "mlp_norm": Tap(_MG + "pre_mlp_layernorm", layout="TB"),
        "mlp_act": Tap(_MG + "mlp.linear_fc2", "in", layout="TB", tp_split=True),
        "mlp_out": Tap(_MG + "mlp", index=0, layout="TB"),
        "out": Tap(_MG[:-1], index=0, layout="TB"),
        "norm": Tap("decoder.final_layernorm", layout="TB"),
    }, fused_norm=("IdentityOp", "Identity")),  # Transformer Engine's spec fuses the norms into the linears
}


def register(backend: str, trace: StackTrace) -> None:
    """Make a backend traceable (a plug-in adapter's row)."""
    TRACES[backend] = trace


def stack_trace(backend_name: str) -> StackTrace:
    try:
        return TRACES[backend_name]
    except KeyError:
        raise UserError(f"backend {backend_name!r} cannot be traced: parity.trace.stacks has no row for it "
                        f"(traceable: {', '.join(TRACES)}); add one with parity.trace.stacks.register") from None
