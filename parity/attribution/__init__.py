"""Where a Meta-vs-Megatron difference comes from: the Megatron-LM Llama-2 doc's four causes, measured.

The doc (docs/architecture.md, "Attribution") names four places where Megatron computes what Meta's
reference computes in another order: fused projections, `torch.baddbmm` attention scores, sin/cos rotary,
and no `torch.set_default_dtype` at initialisation. `parity attribute` scores variants of Meta's own
reference model (same weights, same requests), each switched to Megatron's way at one of those places
(parity.attribution.patches) or at all four, and compares each with plain Meta and with the real megatron
backend; what "all four" leaves between itself and real Megatron is the residual. Causes the doc does not
name but the residual revealed are rows here too (doc=False), with their own variants.

This table is the one place that names causes and variants; the worker (parity.backends.meta, option
"attribution") and the verb (parity.attribution.cli) derive from it. Importing it loads no model stack.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cause:
    name: str
    megatron_way: str  # what the variant does instead of Meta's code (one phrase for the report)
    where: str  # the place in llama_models' reference model it replaces
    doc: bool = True  # one of the four the Megatron-LM doc names (else: found in the residual)


CAUSES: dict[str, Cause] = {c.name: c for c in [
    Cause("fused_projections", "one QKV matmul (Megatron's per-group row order) and one gate;up matmul",
          "Attention wq/wk/wv, FeedForward w1/w3"),
    Cause("baddbmm", "scores = torch.baddbmm(empty, q, k^T, beta=0, alpha=1/sqrt(head_dim)), as "
                     "megatron-core's DotProductAttention", "Attention.forward: matmul, then / sqrt(head_dim)"),
    Cause("sincos_rope", "megatron-core's RotaryEmbedding and _apply_rotary_pos_emb_bshd: cos/sin cast to the "
                         "compute dtype, rotation in it", "apply_rotary_emb: fp32 complex multiply (polar)"),
    Cause("default_dtype", "the model built in fp32 and cast to the compute dtype (Float16Module), no "
                           "set_default_dtype", "the loader's torch.set_default_dtype before Transformer(...)"),
    Cause("rmsnorm", "torch.nn.functional.rms_norm (megatron-core's local spec: torch.nn.RMSNorm), one rounding "
                     "to the compute dtype after the weight", "RMSNorm: normalise in fp32, round, then x weight",
          doc=False),
    Cause("rotate_half_layout", "q/k rows in the rotate-half order Megatron's (and HF's) checkpoints hold, rotated "
                                "by megatron-core's non-interleaved sin/cos: q.k sums head_dim in another order",
          "Meta's interleaved (pairwise) q/k rows and rotary", doc=False),
]}

DOC_CAUSES = tuple(n for n, c in CAUSES.items() if c.doc)
EXTRA_CAUSES = tuple(n for n, c in CAUSES.items() if not c.doc)

# What a cause cannot exist without: the rotate-half layout is only rotated by sin/cos.
NEEDS = {"rotate_half_layout": ("sincos_rope",)}

# variant name -> the causes switched to Megatron's way. Each cause alone (with what it needs); the doc's
# four together ("all"); then the four plus the causes found in the residual, added one at a time in
# EXTRA_CAUSES' order ("all+rmsnorm", "all+rmsnorm+rotate_half_layout"): the last is Megatron's arithmetic.
VARIANTS: dict[str, tuple[str, ...]] = {
    **{n: (n,) for n in DOC_CAUSES},
    "all": DOC_CAUSES,
    **{n: NEEDS.get(n, ()) + (n,) for n in EXTRA_CAUSES},
    **{"+".join(("all",) + EXTRA_CAUSES[:i + 1]): DOC_CAUSES + EXTRA_CAUSES[:i + 1] for i in range(len(EXTRA_CAUSES))},
}


def check_causes(causes, where: str) -> tuple[str, ...]:
    from parity.errors import UserError

    unknown = [c for c in causes if c not in CAUSES]
    if unknown:
        raise UserError(f"{where}: unknown attribution cause {unknown[0]!r}; known: {', '.join(CAUSES)}")
    for c in causes:
        if any(n not in causes for n in NEEDS.get(c, ())):
            raise UserError(f"{where}: cause {c!r} needs {', '.join(NEEDS[c])} switched too")
    return tuple(causes)
