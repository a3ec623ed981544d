"""Meta's reference model, switched at the places parity.attribution.CAUSES names to megatron-core's way.

Only module *instances* of a loaded llama_models Transformer are patched (never llama_models' classes);
everything not named by a cause stays Meta's own code. Three causes live inside Attention.forward, so
attention_forward below is llama_models.llama3.model.Attention.forward line for line with those three
places switchable (tests/test_attribution.py checks that with none switched it is bit-identical to Meta's).
Where Megatron's way is a megatron-core function (rotary), that function is called, not rewritten.

fp64 (widen): Meta's code rounds to fp32 in four places whatever the dtype (RMSNorm's x.float(), rotary's
xq.float() and complex64 angles, softmax's scores.float(), the logits' .float()). An fp64 comparison of
variants must not carry fp32 rounding, so in fp64 attribution runs those casts keep fp64 and both rotary
tables (Meta's freqs_cis and megatron's inv_freq) come from one fp64 inv_freq. Then every variant is the
same arithmetic re-associated, which tests hold to 1e-10 nats.
"""

from __future__ import annotations

import contextlib
import math
import types

import torch
import torch.nn.functional as F

ATTENTION_CAUSES = frozenset({"fused_projections", "baddbmm", "sincos_rope"})


def apply(model, causes, size, device: torch.device, widen: bool) -> None:
    """Patch the loaded (and weight-loaded) model for `causes`; default_dtype acts in the loader
    (parity.backends.meta), before this."""
    causes = frozenset(causes)
    inv_freq = None
    if widen:
        inv_freq = _inv_freq_fp64(size).to(device)
        t = torch.arange(model.freqs_cis.shape[0], dtype=torch.float64, device=device)
        angles = torch.outer(t, inv_freq)
        model.freqs_cis = torch.polar(torch.ones_like(angles), angles)  # complex128, as llama_models' in fp64
    rotate_half = "rotate_half_layout" in causes
    rope = _megatron_rope(size, device, inv_freq, interleaved=not rotate_half) if "sincos_rope" in causes else None
    for layer in model.layers:
        att, ff = layer.attention, layer.feed_forward
        if rotate_half:  # the converters' permutation of q/k rows (Meta pairwise -> rotate-half), per head
            for linear in (att.wq, att.wk):
                linear.weight.data = _rotate_half_rows(linear.weight.data, att.head_dim)
        if "fused_projections" in causes:
            att._parity_wqkv = _fused_qkv_weight(att)
            ff._parity_w13 = torch.cat([ff.w1.weight, ff.w3.weight])
            for linear in (att.wq, att.wk, att.wv, ff.w1, ff.w3):  # no longer read: give the memory back
                linear.weight.data = linear.weight.data.new_empty(0)
            ff.forward = types.MethodType(_fused_ffn_forward, ff)
        if causes & ATTENTION_CAUSES:
            att._parity_causes = causes
            att._parity_rope = rope
            att.forward = types.MethodType(attention_forward, att)
        if "rmsnorm" in causes:
            for norm in (layer.attention_norm, layer.ffn_norm):
                norm.forward = types.MethodType(_torch_rms_norm_forward, norm)
    if "rmsnorm" in causes:
        model.norm.forward = types.MethodType(_torch_rms_norm_forward, model.norm)


@contextlib.contextmanager
def widened():
    """While Meta's model runs: `.float()` of an fp64 tensor keeps it fp64 (see the module docstring)."""
    original = torch.Tensor.float

    def keep_fp64(t, *args, **kwargs):
        return t if t.dtype == torch.float64 else original(t, *args, **kwargs)

    torch.Tensor.float = keep_fp64
    try:
        yield
    finally:
        torch.Tensor.float = original


def attention_forward(self, x, start_pos, freqs_cis, mask):
    """llama_models' Attention.forward; the three `if` branches are the causes, the rest is Meta's code."""
    from llama_models.llama3.model import apply_rotary_emb, repeat_kv

    causes = self._parity_causes
    bsz, seqlen, _ = x.shape
    if "fused_projections" in causes:
        xq, xk, xv = _split_qkv(F.linear(x, self._parity_wqkv), self)
    else:
        xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)
        xq = xq.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = xk.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = xv.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)

    if "sincos_rope" in causes:
        xq, xk = _megatron_rotary(self._parity_rope, xq, xk, start_pos)
    else:
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)

    self.cache_k = self.cache_k.to(xq)
    self.cache_v = self.cache_v.to(xq)
    self.cache_k[:bsz, start_pos: start_pos + seqlen] = xk
    self.cache_v[:bsz, start_pos: start_pos + seqlen] = xv
    keys = self.cache_k[:bsz, : start_pos + seqlen]
    values = self.cache_v[:bsz, : start_pos + seqlen]
    keys = repeat_kv(keys, self.n_rep)
    values = repeat_kv(values, self.n_rep)

    xq = xq.transpose(1, 2)
    keys = keys.transpose(1, 2)
    values = values.transpose(1, 2)
    if "baddbmm" in causes:
        scores = _baddbmm_scores(xq, keys, self.head_dim)
    else:
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(self.head_dim)
    if mask is not None:
        scores = scores + mask
    scores = F.softmax(scores.float(), dim=-1).type_as(xq)
    if "baddbmm" in causes:
        output = _bmm_context(scores, values)
    else:
        output = torch.matmul(scores, values)
    output = output.transpose(1, 2).contiguous().view(bsz, seqlen, -1)
    return self.wo(output)


# ---- fused_projections: megatron-core's linear_qkv and linear_fc1 -------------------------------------
def _fused_qkv_weight(att) -> torch.Tensor:
    """This rank's wq, wk, wv rows in megatron's order: per kv group, its query heads, its key, its value."""
    hd, rep = att.head_dim, att.n_rep
    wq, wk, wv = att.wq.weight, att.wk.weight, att.wv.weight
    rows = []
    for g in range(att.n_local_kv_heads):
        rows += [wq[g * rep * hd:(g + 1) * rep * hd], wk[g * hd:(g + 1) * hd], wv[g * hd:(g + 1) * hd]]
    return torch.cat(rows)


def _split_qkv(mixed: torch.Tensor, att):
    """megatron-core's SelfAttention.get_query_key_value_tensors: [.., groups, (rep + 2) * hd] split."""
    b, s, _ = mixed.shape
    hd, rep = att.head_dim, att.n_rep
    mixed = mixed.view(b, s, att.n_local_kv_heads, (rep + 2) * hd)
    q, k, v = torch.split(mixed, [rep * hd, hd, hd], dim=3)
    return q.reshape(b, s, att.n_local_heads, hd), k, v


def _fused_ffn_forward(self, x):
    """megatron-core's MLP with a gated linear unit: fc1 = [gate; up] in one matmul, chunk, silu(gate) * up."""
    gate, up = torch.chunk(F.linear(x, self._parity_w13), 2, dim=-1)
    return self.w2(F.silu(gate) * up)


# ---- baddbmm: megatron-core's DotProductAttention ------------------------------------------------------
# Megatron keeps q, k, v as [s, b * heads, head_dim] buffers and multiplies their [b * heads, ...] views with
# 3-d batched products; the products' operands have those strides (which CPU and GPU kernels see).
def _megatron_buffer(t: torch.Tensor) -> torch.Tensor:
    """[b, h, s, d] -> megatron's [s, b * h, d] buffer (a copy in that memory order)."""
    b, h, s, d = t.shape
    return t.permute(2, 0, 1, 3).reshape(s, b * h, d)


def _baddbmm_scores(xq: torch.Tensor, keys: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[b, h, s, d] x [b, h, sk, d] -> [b, h, s, sk]: the scale is baddbmm's alpha (softmax_scale =
    1/sqrt(head_dim)) applied inside the product, beta=0 over an uninitialised buffer, as megatron does."""
    b, h, s, _ = xq.shape
    sk = keys.shape[2]
    q, k = _megatron_buffer(xq), _megatron_buffer(keys)
    buffer = torch.empty(b * h, s, sk, dtype=xq.dtype, device=xq.device)
    out = torch.baddbmm(buffer, q.transpose(0, 1), k.transpose(0, 1).transpose(1, 2),
                        beta=0.0, alpha=1.0 / math.sqrt(head_dim))
    return out.view(b, h, s, sk)


def _bmm_context(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """probs [b, h, s, sk] x values [b, h, sk, d] -> [b, h, s, d] by torch.bmm on megatron's buffers."""
    b, h, s, sk = probs.shape
    v = _megatron_buffer(values)
    return torch.bmm(probs.reshape(b * h, s, sk), v.transpose(0, 1)).view(b, h, s, v.shape[-1])


# ---- sincos_rope: megatron-core's RotaryEmbedding ------------------------------------------------------
def _inv_freq_fp64(size) -> torch.Tensor:
    from llama_models.llama3.model import apply_scaling

    hd = size.head_dim
    inv = 1.0 / (size.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    return apply_scaling(inv) if size.rope_scaling is not None else inv


def _rotate_half_rows(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Within each head, rows (0, 1), (2, 3), ... -> (0, 2, 4, ..., 1, 3, 5, ...): the rotate-half layout."""
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)]).to(w.device)
    return w.view(-1, head_dim, w.shape[-1])[:, order].reshape(w.shape)


def _megatron_rope(size, device: torch.device, inv_freq: torch.Tensor | None, interleaved: bool = True):
    """megatron-core's RotaryEmbedding: interleaved for Meta's pairwise q/k layout, else rotate-half (Megatron's
    own checkpoints); `inv_freq`: the fp64 table of an fp64 comparison (else megatron's own fp32 one)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    scaling = size.rope_scaling
    rope = RotaryEmbedding(kv_channels=size.head_dim, rotary_percent=1.0, rotary_interleaved=interleaved,
                           rotary_base=size.rope_theta, rope_scaling=scaling is not None,
                           rope_scaling_factor=scaling.factor if scaling else 8.0, use_cpu_initialization=True)
    rope.inv_freq = (inv_freq if inv_freq is not None else rope.inv_freq).to(device)
    return rope


def _megatron_rotary(rope, xq: torch.Tensor, xk: torch.Tensor, start_pos: int):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from parity.backends.cpu_shims import current_device_is_cpu

    # get_emb moves a CPU inv_freq to torch.cuda.current_device(): on CPU that lookup answers "cpu"
    guard = current_device_is_cpu() if xq.device.type == "cpu" else contextlib.nullcontext()
    with guard:
        emb = rope.get_emb(start_pos + xq.shape[1])[start_pos:]  # [s, 1, 1, hd]
    # megatron's layout is [s, b, h, d], Meta's [b, s, h, d]: a transposed view, the same elementwise ops
    interleaved = rope.rotary_interleaved
    q = _apply_rotary_pos_emb_bshd(xq.transpose(0, 1), emb, rotary_interleaved=interleaved).transpose(0, 1)
    k = _apply_rotary_pos_emb_bshd(xk.transpose(0, 1), emb, rotary_interleaved=interleaved).transpose(0, 1)
    return q, k


# ---- rmsnorm (found in the residual): megatron-core local spec's torch.nn.RMSNorm ----------------------
def _torch_rms_norm_forward(self, x):
    return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
