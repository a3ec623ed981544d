"""Boundary by boundary: how far two captures are apart, how far they may be, and where they first part.

Per boundary (all in fp64): max |a - b|, relative L2 = ||a - b|| / ||a|| (a = the reference stack) and
cosine. The noise a boundary is held against is measured, not assumed: the reference stack in the
run's dtype against the same stack, on the same request, in a wider dtype (NOISE_REFERENCE: fp64 for
fp32, fp32 for bf16 / fp16). Rounding grows with depth and differs per kind of boundary, so each
boundary gets its own threshold:

    threshold = NOISE_FACTOR * noise + unit roundoff of the dtype

(the roundoff term covers boundaries that are exact in both runs, e.g. an embedding lookup). Two
healthy stacks differ by about the noise (measured on the mini sizes: at most 1.4x in bf16 and 0.8x in
fp32, docs/architecture.md "Tracing"); a converter bug by orders of magnitude more. The first
divergence is the first boundary, in forward order, whose relative L2 exceeds its threshold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from parity.errors import UserError
from parity.trace.boundaries import parse

NOISE_FACTOR = 4.0
# dtype of a run -> the precision its noise is measured against: the next wider one is enough (its own
# rounding is orders of magnitude smaller) and costs far less memory than fp64 for a bf16 model
NOISE_REFERENCE = {"fp32": "fp64", "bf16": "fp32", "fp16": "fp32"}
NOISE_METHOD = "reference stack in the run's dtype vs the same stack in {high}, same request"


@dataclass
class Row:
    name: str
    layer: int | None
    module: str
    max_abs: float
    rel_l2: float
    cosine: float
    noise: float
    threshold: float
    diverged: bool

    def to_json(self) -> dict:
        return asdict(self)


def unit_roundoff(dtype: str) -> float:
    from parity.dtypes import torch_dtype

    return float(torch.finfo(torch_dtype(dtype)).eps) / 2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nd = float(a.norm()), float((a - b).norm())
    if na == 0:
        return 0.0 if nd == 0 else float("inf")
    return nd / na


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float((a.flatten() @ b.flatten()) / (na * nb))


def _pair(x: dict, y: dict, name: str, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name not in x or name not in y:
        raise UserError(f"explain: boundary {name} is missing from the {what} capture")
    a, b = x[name].double(), y[name].double()
    if a.shape != b.shape:
        raise UserError(f"explain: boundary {name} has shape {tuple(a.shape)} in one stack and {tuple(b.shape)} "
                        f"in the other ({what}); the two checkpoints are not the same model size")
    return a, b


def compare(ref: dict, other: dict, high: dict, dtype: str) -> list[Row]:
    """Rows in the reference capture's (forward) order; `high` is the reference stack in
    NOISE_REFERENCE[dtype]."""
    floor = unit_roundoff(dtype)
    rows = []
    for name in ref:
        a, b = _pair(ref, other, name, "two stacks'")
        h, _ = _pair(high, ref, name, "wider-dtype reference")
        noise = _rel(h, a)
        rel = _rel(a, b)
        threshold = NOISE_FACTOR * noise + floor
        layer, kind = parse(name)
        rows.append(Row(name, layer, kind, float((a - b).abs().max()) if a.numel() else 0.0, rel, _cosine(a, b),
                        noise, threshold, rel > threshold))
    return rows


def first_divergence(rows: list[Row]) -> Row | None:
    return next((r for r in rows if r.diverged), None)


def summary(rows: list[Row]) -> str:
    """'first divergence at layers.1.attn_out (rel 0.41; attn_ctx 2e-07)' or 'no divergence above the noise'."""
    first = first_divergence(rows)
    if first is None:
        worst = max(rows, key=lambda r: r.rel_l2 / r.threshold)
        return (f"no divergence above the noise (closest: {worst.name}, rel {worst.rel_l2:.2g} "
                f"vs threshold {worst.threshold:.2g})")
    i = rows.index(first)
    before = f"; {rows[i - 1].module} {rows[i - 1].rel_l2:.1g}" if i else ""
    return f"first divergence at {first.name} (rel {first.rel_l2:.2g}{before})"
