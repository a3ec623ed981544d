"""Meta's reference stack: llama_models' Transformer under fairscale model parallel, from Meta files.

For rope_theta 10000 and use_scaled_rope False, llama_models.llama3.model.Transformer computes what
Llama-2's model.py computes (docs/architecture.md, "Checkpoint layouts"). Two differences from Llama-2's
loader are bridged here:
- llama_models' VocabParallelEmbedding splits tok_embeddings on the vocab (dim 0); the Llama-2 files
  split it on dim 1. Each key is cut for the *run's* model-parallel size (MP_SPLIT_DIM), which may
  differ from the file count (any MP dividing the heads): MetaSource.block reads this rank's block,
  from the one file that holds it when the files are split the same way.
- Llama-2's loader builds the model under a default dtype (torch.cuda.HalfTensor); we build under the
  job's dtype the same way, and put the default back afterwards.
- Device: fairscale makes its weights with the legacy `torch.Tensor(...)` constructor, which a
  `with torch.device(...)` context does not redirect, so the model is built on the CPU, moved to the
  job's device, then loaded, as llama_models' own loader does (build, load, `model.to(device)`). On
  CUDA a node's ranks do this one at a time (dist.load_in_turns): one rank's shard is in host memory at
  a time.
- Kv cache: the reference model writes keys and values into a preallocated cache and reads them back.
  We always score from position 0, so one flat buffer per layer, allocated once for the job's largest
  batch (reserve), is viewed in each batch's shape: the same numbers without a reallocation per shape.
"""

from __future__ import annotations

import math

import torch

from parity.arch import Size
from parity.attribution import check_causes
from parity.backends.base import Backend
from parity.backends.dist import init_distributed, load_in_turns
from parity.checkpoints.spec import leaf
from parity.dtypes import torch_dtype
from parity.errors import UserError

# Which dim of each Meta weight fairscale splits across model-parallel ranks (None: replicated).
# ColumnParallelLinear and VocabParallelEmbedding split dim 0, RowParallelLinear dim 1.
MP_SPLIT_DIM = {
    "tok_embeddings.weight": 0,  # vocab-parallel here (the Llama-2 files split dim 1)
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
    "norm.weight": None,
    "output.weight": 0,
}


def rank_state(src, rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's tensors for a model-parallel size of `world`, read key by key from the mmap'd files
    (only this rank's block of each key is read, never the whole model)."""
    out = {}
    for key in src.spec.keys():
        d = MP_SPLIT_DIM[leaf(key)]
        if d is None:
            out[key] = src.get(key)
        else:
            w = src.spec.shape(key)[d] // world
            out[key] = src.block(key, d, rank * w, (rank + 1) * w)
    return out


def check_mp(size: Size, vocab: int, mp: int, where) -> None:
    checks = {"query heads": size.n_heads, "kv heads": size.n_kv_heads, "vocab": vocab,
              "ffn width": size.ffn_dim}
    bad = [f"{what} {n}" for what, n in checks.items() if n % mp]
    if mp < 1 or bad:
        raise UserError(f"{where}: model-parallel size {mp} does not divide {', '.join(bad) or 'anything'}; "
                        f"pick an MP that divides the heads (e.g. the file count)")


class MetaBackend(Backend):
    name = "meta"

    def load(self) -> None:
        import fairscale.nn.model_parallel.initialize as fs_init
        from llama_models.llama3.args import ModelArgs
        from llama_models.llama3.model import Transformer

        from parity.checkpoints import meta as meta_ckpt

        checkpoint = self.checkpoint
        params = meta_ckpt.read_params(checkpoint)
        mp = self.tp or meta_ckpt.n_files(checkpoint)
        src = meta_ckpt.MetaSource(checkpoint)  # mmap'd files, checked against params.json
        vocab = src.spec.vocab
        self.check_vocab(vocab)
        check_mp(src.spec.size, vocab, mp, checkpoint)
        self.rank, world = init_distributed(self.device.type)
        if world != mp:
            raise UserError(f"{checkpoint}: model-parallel size {mp} needs {mp} processes, got {world}; "
                            f"launch with `parity.backends.worker.launch(job, {mp})`")
        if not fs_init.model_parallel_is_initialized():
            fs_init.initialize_model_parallel(mp)

        self.vocab_size = vocab
        self.max_length = self.requested_max_length or src.spec.size.max_seq_len
        # the size's rotary (arch: Llama 2 theta 10000, which its params.json does not name while llama_models'
        # default is Llama 3's; Llama 3.1's use_scaled_rope = llama_models' hard-coded apply_scaling)
        size = src.spec.size
        args = ModelArgs(**{**params, "vocab_size": vocab, "rope_theta": size.rope_theta,
                            "use_scaled_rope": size.rope_scaling is not None,
                            "max_seq_len": self.max_length, "max_batch_size": 1})
        self.heads_per_rank = src.spec.size.n_heads // mp
        self._kv_shape = (src.spec.size.n_kv_heads // mp, src.spec.size.head_dim)  # per token, on this rank
        # the kv cache holds keys and values of every layer for every batch token
        self.cache_bytes_per_token = 2 * src.spec.size.n_layers * math.prod(self._kv_shape) * \
            torch_dtype(self.dtype).itemsize

        attributed = "attribution" in self.options
        causes = check_causes(self.options.get("attribution") or [], f"{checkpoint}: option attribution")
        # Megatron's way (the default_dtype cause): build in fp32, then cast the module as Float16Module does
        build_dtype = torch.get_default_dtype() if "default_dtype" in causes else torch_dtype(self.dtype)

        def build_and_load():
            previous = torch.get_default_dtype()
            torch.set_default_dtype(build_dtype)  # as Llama-2's loader does before Transformer(...)
            try:
                model = Transformer(args)  # on the CPU: see the module docstring
            finally:
                torch.set_default_dtype(previous)
            for layer in model.layers:  # the max_batch_size x max_seq_len cache made on the CPU: replaced
                layer.attention.cache_k = layer.attention.cache_v = None  # by views of one buffer (reserve)
            # parameters only: freqs_cis and the kv cache are plain attributes
            model.to(device=self.device, dtype=torch_dtype(self.dtype))
            model.freqs_cis = model.freqs_cis.to(self.device)
            model.load_state_dict(rank_state(src, self.rank, world), strict=True)
            return model

        self.model = load_in_turns(build_and_load) if self.device.type == "cuda" else build_and_load()
        self.model.eval()
        self._widen = attributed and self.dtype == "fp64"
        if attributed:
            from parity.attribution import patches

            patches.apply(self.model, causes, size, self.device, widen=self._widen)
        self._cache_tokens = 0

    # Attention scores [batch, local heads, T, T]: matmul, scaling and mask add in the compute dtype, then
    # softmax in fp32 and a cast back (llama_models' Attention.forward): about 12 bytes per element at peak.
    score_bytes = 12

    def reserve(self, tokens: int) -> None:
        """One kv cache buffer per layer for `tokens` batch tokens (rows x width), made once for the job's
        largest batch; each batch views it in its own shape (_view_kv_cache)."""
        if tokens <= self._cache_tokens:
            return
        shape = (tokens, *self._kv_shape)
        for layer in self.model.layers:
            att = layer.attention
            # dtype: what Attention.forward casts the cache to (`cache_k.to(xq)`), so no copy is made
            att.flat_k = torch.zeros(shape, dtype=torch_dtype(self.dtype), device=self.device)
            att.flat_v = torch.zeros(shape, dtype=torch_dtype(self.dtype), device=self.device)
        self._cache_tokens = tokens

    def _view_kv_cache(self, batch: int, seqlen: int) -> None:
        """The reference model preallocates max_batch_size x max_seq_len per layer; we always score from
        position 0 and write every position before reading it, so a view of the job's buffer in exactly
        the batch's shape computes the same thing."""
        self.reserve(batch * seqlen)  # a no-op after the job's reserve, unless a caller skipped it
        for layer in self.model.layers:
            att = layer.attention
            n = batch * seqlen
            att.cache_k = att.flat_k[:n].view(batch, seqlen, *self._kv_shape)
            att.cache_v = att.flat_v[:n].view(batch, seqlen, *self._kv_shape)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self._view_kv_cache(*tokens.shape)
        if self._widen:
            from parity.attribution.patches import widened

            with widened():
                return self.model(tokens, 0)[..., :self.vocab_size]
        return self.model(tokens, 0)[..., :self.vocab_size]
