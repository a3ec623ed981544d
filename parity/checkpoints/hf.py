"""Hugging Face layout: config.json (LlamaForCausalLM) + safetensors shards + index + tokenizer files.

Key table below maps Meta's names to transformers' names. The only layout change: wq and wk rows are
permuted from Meta's interleaved rotary pairs to the rotate-half convention transformers uses
(spec.permute).
Shards: embeddings, then one shard per layer, then final norm + lm_head, so a writer holds one layer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from parity.checkpoints.spec import Source, Spec, match_size, permute, split_layer, unpermute
from parity.errors import UserError
from parity.io import read_json, write_json

# Meta leaf -> HF leaf ({i} = layer).
HF_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def hf_key(meta_key: str) -> str:
    template, i = split_layer(meta_key)
    return HF_KEYS[template].format(i=i)


def heads_of(key: str, spec: Spec) -> int | None:
    """How many heads a q/k matrix holds (the permuted ones); None for everything else."""
    if key.endswith("attention.wq.weight"):
        return spec.size.n_heads
    if key.endswith("attention.wk.weight"):
        return spec.size.n_kv_heads
    return None


def to_hf(key: str, t: torch.Tensor, spec: Spec) -> torch.Tensor:
    h = heads_of(key, spec)
    return permute(t, h) if h else t


def config(spec: Spec, dtype: torch.dtype) -> dict:
    """config.json, produced by transformers' own LlamaConfig so it matches what it reads."""
    from transformers import LlamaConfig

    s = spec.size
    cfg = LlamaConfig(
        vocab_size=spec.vocab, hidden_size=s.dim, intermediate_size=s.ffn_dim,
        num_hidden_layers=s.n_layers, num_attention_heads=s.n_heads, num_key_value_heads=s.n_kv_heads,
        head_dim=s.head_dim, hidden_act="silu", max_position_embeddings=s.max_seq_len,
        rms_norm_eps=s.norm_eps, rope_theta=s.rope_theta, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=None, attention_bias=False, mlp_bias=False,
        architectures=["LlamaForCausalLM"], dtype=str(dtype).removeprefix("torch."),
    )
    d = cfg.to_dict()
    d.pop("transformers_version", None)  # keep outputs identical across transformers releases
    return d



def write_tokenizer(tok: Path, out: Path, spec: Spec) -> None:
    """tokenizer.model + HF tokenizer files that encode exactly as sentencepiece (hf_tokenizer.py)."""
    from parity.checkpoints.hf_tokenizer import write_tokenizer_files

    write_tokenizer_files(tok, out, spec.size.max_seq_len)


def shard_plan(spec: Spec) -> list[list[str]]:
    """Meta keys per shard: embeddings; each layer; final norm + lm_head."""
    return ([["tok_embeddings.weight"]] + [spec.layer_keys(i) for i in range(spec.size.n_layers)]
            + [["norm.weight", "output.weight"]])


def write_hf(src: Source, out: Path, dtype: torch.dtype | None = None) -> None:
    from safetensors.torch import save_file

    spec = src.spec
    dtype = dtype or src.dtype
    plan = shard_plan(spec)
    weight_map, total = {}, 0
    for n, keys in enumerate(plan, start=1):
        name = f"model-{n:05d}-of-{len(plan):05d}.safetensors"
        shard = {}
        for key in keys:
            t = to_hf(key, src.get(key).to(dtype), spec).contiguous()
            shard[hf_key(key)] = t
            weight_map[hf_key(key)] = name
            total += t.numel() * t.element_size()
        save_file(shard, str(out / name), metadata={"format": "pt"})
        del shard
    write_json(out / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(out / "config.json", config(spec, dtype))
    if src.tokenizer is not None:
        write_tokenizer(src.tokenizer, out, spec)


class HfSource(Source):
    """Reads an HF directory lazily through safetensors' mmap'd safe_open."""

    def __init__(self, d: str | Path, size_name: str | None = None):
        from safetensors import SafetensorError, safe_open

        self.dir = Path(d)
        cfg_path = self.dir / "config.json"
        if not cfg_path.is_file():
            raise UserError(f"{cfg_path}: config.json not found; an HF checkpoint directory needs it")
        cfg = read_json(cfg_path, "config.json")
        try:
            size = match_size(cfg_path, dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                              n_heads=cfg["num_attention_heads"],
                              n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                              ffn_dim=cfg["intermediate_size"], size_name=size_name)
            vocab = cfg["vocab_size"]
        except KeyError as e:
            raise UserError(f"{cfg_path}: config.json lacks {e.args[0]!r}") from None
        self.spec = Spec(size, vocab)
        if (self.dir / INDEX).is_file():
            weight_map = read_json(self.dir / INDEX, "safetensors index").get("weight_map", {})
        elif (self.dir / SINGLE).is_file():
            weight_map = None
        else:
            raise UserError(f"{self.dir}: neither {INDEX} nor {SINGLE} found")
        self.handles, self.where = {}, {}
        names = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE]
        for name in names:
            p = self.dir / name
            if not p.is_file():
                raise UserError(f"{p}: safetensors shard listed in {INDEX} not found")
            try:
                h = safe_open(str(p), framework="pt")
                keys = list(h.keys())
            except (SafetensorError, OSError) as e:
                raise UserError(f"{p}: cannot read safetensors ({str(e)[:160]}); truncated or corrupt") from None
            self.handles[name] = h
            listed = keys if weight_map is None else [k for k, v in weight_map.items() if v == name]
            for k in listed:  # the index, when there is one, says where each tensor is
                if k not in keys:
                    raise UserError(f"{p}: missing key {k!r} (listed in {INDEX})")
                self.where[k] = name
        for key in self.spec.keys():
            hk = hf_key(key)
            if hk not in self.where:
                raise UserError(f"{self.dir / (INDEX if weight_map is not None else SINGLE)}: missing key {hk!r}")
            shape = tuple(self.handles[self.where[hk]].get_slice(hk).get_shape())
            if shape != self.spec.shape(key):
                raise UserError(f"{self.dir / self.where[hk]}: {hk} has shape {shape}, "
                                f"expected {self.spec.shape(key)} for {size.name}")
        self.dtype = self._raw("tok_embeddings.weight").dtype
        tok = self.dir / "tokenizer.model"
        self.tokenizer = tok if tok.is_file() else None

    def _raw(self, key: str) -> torch.Tensor:
        from safetensors import SafetensorError

        hk = hf_key(key)
        try:
            return self.handles[self.where[hk]].get_tensor(hk)
        except SafetensorError as e:
            raise UserError(f"{self.dir / self.where[hk]}: cannot read {hk} ({str(e)[:160]}); truncated or corrupt") from None

    def get(self, key: str) -> torch.Tensor:
        t = self._raw(key)
        h = heads_of(key, self.spec)
        return unpermute(t, h) if h else t

    def block(self, key: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Read only the block (safetensors slices the file); q/k blocks must be whole heads."""
        from safetensors import SafetensorError

        h, hd = heads_of(key, self.spec), self.spec.size.head_dim
        if h and (dim != 0 or start % hd or stop % hd):
            return super().block(key, dim, start, stop)
        hk = hf_key(key)
        index = (slice(start, stop),) if dim == 0 else (slice(None), slice(start, stop))
        try:
            t = self.handles[self.where[hk]].get_slice(hk)[index]
        except SafetensorError as e:
            raise UserError(f"{self.dir / self.where[hk]}: cannot read {hk} ({str(e)[:160]}); truncated or corrupt") from None
        return unpermute(t, (stop - start) // hd) if h else t

