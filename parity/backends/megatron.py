"""Megatron stack: megatron-core GPTModel from a Megatron-LM checkpoint.

The model is configured from the checkpoint's saved args (as Megatron-LM's --use-checkpoint-args
does) and parallel_state is initialised over torch.distributed. Then, by the checkpoint's format:
- legacy (mp_rank_TT[_PPP]): each rank loads its own TP shard. The run's TP must equal the shard
  count: re-sharding a legacy checkpoint is the converter's job (`parity convert --target-tp`). Pipeline
  stages are merged into the one model on load (forward-only scoring needs no pipeline schedule, and
  megatron-core's schedules allocate on "cuda" literally, so they cannot run on CPU).
- torch_dist: megatron-core's own loader, dist_checkpointing.load(model.sharded_state_dict(), dir), as
  Megatron-LM loads it, at any TP that divides heads, kv groups and ffn width. parity checks the
  directory first (checkpoints/torch_dist.py) and keeps two of torch's unsafe reads out of it: the
  .metadata pickle goes through parity's restricted unpickler (dcp.safe_metadata), and the layers'
  empty _extra_state objects (which torch would unpickle with weights_only=False) are not requested.

Layer spec (option "spec", `parity run --megatron-spec`): "local" (default; megatron-core's own
modules, runs on CPU) or "te" (Transformer Engine's, what Megatron-LM trains with; needs
transformer_engine and CUDA). Checkpoints saved under either spec's names load into either.

Precision as Megatron-LM runs it: for bf16 / fp16 Megatron-LM wraps the model in Float16Module, which
casts the whole module (`module.bfloat16()`), so the local spec's torch.nn.RMSNorm weights, made in
fp32, compute in bf16 like everything else; we cast the same way.

Megatron pads the vocabulary (to a multiple of 128 * TP); logits are vocab-parallel, so they are
gathered over the TP group and then cut to the true vocab: padded entries are never scored.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings

import torch

from parity.arch import LLAMA2_ROPE_THETA
from parity.backends.base import Backend
from parity.backends.dist import init_distributed
from parity.checkpoints import megatron as mg_ckpt
from parity.dtypes import torch_dtype
from parity.errors import UserError

MEGATRON_SEED = 1234  # Megatron-LM's --seed default, for saved args without one


# megatron-core announces at import that it falls back from Transformer Engine / Apex: that is the
# local spec we choose, not news
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).* not installed")


@contextlib.contextmanager
def _compile_on_first_call():
    """torch.compile(fn) that imports torch's compiler only when fn is first called.

    megatron-core binds `jit_fuser = torch.compile` (megatron/core/jit.py) and decorates its fusions with
    it at import; each decoration imports dynamo and inductor, about 3 s of CPU in every megatron worker
    and rank. The configs here switch those fusions off (transformer_config), so nothing compiled ever
    runs; if one does run, it is compiled on that first call with the same arguments, as torch.compile
    itself would (it compiles lazily too), so behaviour is unchanged.
    """
    real = torch.compile

    def deferred(model=None, **options):
        if model is None:  # used as @torch.compile(**options)
            return lambda fn: deferred(fn, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = real(model, **options)
            return compiled(*args, **kwargs)
        return call

    torch.compile = deferred
    try:
        yield
    finally:
        torch.compile = real


def import_megatron_core() -> None:
    """Import megatron.core (once per process) with its jit_fuser decorations deferred. Call before any
    `from megatron.core ...`; a process that imported it already keeps what it has."""
    if "megatron.core" in sys.modules:
        return
    with _compile_on_first_call():
        import megatron.core  # noqa: F401  (binds megatron.core.jit.jit_fuser for every later module)


def _layer_spec(spec: str, device: str, checkpoint):
    """config -> megatron-core's GPT layer spec `spec` (checked before anything is loaded)."""
    import_megatron_core()
    from megatron.core.models.gpt import gpt_layer_specs

    if spec == "local":
        return lambda config: gpt_layer_specs.get_gpt_layer_local_spec(normalization=config.normalization)
    if spec != "te":
        raise UserError(f"{checkpoint}: unknown megatron layer spec {spec!r}; use local or te")
    if device != "cuda":
        raise UserError(f"{checkpoint}: the te layer spec (Transformer Engine) runs on cuda only; "
                        f"use --megatron-spec local on {device}")
    try:
        import transformer_engine  # noqa: F401
    except (ImportError, OSError) as e:
        raise UserError(f"{checkpoint}: --megatron-spec te needs transformer_engine, which does not import here "
                        f"({str(e).splitlines()[0][:150]}); install it or use --megatron-spec local") from None
    return lambda config: gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()


def causal_mask(seqlen: int, device: torch.device) -> torch.Tensor:
    """Megatron's convention (True = masked out), on the model's device. Always passed explicitly:
    megatron-core's default mask is built on "cuda"."""
    return torch.triu(torch.ones(seqlen, seqlen, dtype=torch.bool, device=device), diagonal=1)[None, None]


def transformer_config(args, tp: int, dtype: torch.dtype, device: str):
    """TransformerConfig from Megatron-LM's saved args (names as in megatron/training/arguments.py)."""
    import torch.nn.functional as F

    import_megatron_core()
    from megatron.core.transformer.transformer_config import TransformerConfig

    heads = args.num_attention_heads
    swiglu = getattr(args, "swiglu", True)
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=heads,
        num_query_groups=mg_ckpt.kv_groups(args),
        kv_channels=getattr(args, "kv_channels", None) or args.hidden_size // heads,
        normalization=getattr(args, "normalization", "RMSNorm"),
        layernorm_epsilon=mg_ckpt.norm_eps(args),
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        add_bias_linear=getattr(args, "add_bias_linear", False),
        add_qkv_bias=getattr(args, "add_qkv_bias", False),
        attention_softmax_in_fp32=getattr(args, "attention_softmax_in_fp32", True),
        apply_query_key_layer_scaling=getattr(args, "apply_query_key_layer_scaling", False),
        rotary_interleaved=getattr(args, "rotary_interleaved", False),
        tensor_model_parallel_size=tp,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # inference: no dropout, no training-only fusions, weights come from the checkpoint
        hidden_dropout=0.0,
        attention_dropout=0.0,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=device == "cpu",
        perform_initialization=False,
    )


def build_gpt(args, tp: int, vocab_rows: int, dtype: torch.dtype, device: str, layer_spec=None):
    """megatron-core's GPTModel (both pipeline ends) as the saved args describe it, with `vocab_rows`
    (the padded vocabulary) embedding and output rows; weights not initialised. `layer_spec`: config ->
    layer spec (_layer_spec; default the local one)."""
    import_megatron_core()
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(args, tp, dtype, device)
    return GPTModel(
        config=config,
        transformer_layer_spec=(layer_spec or _layer_spec("local", device, None))(config),
        vocab_size=vocab_rows,
        max_sequence_length=int(args.max_position_embeddings),
        pre_process=True,
        post_process=True,
        share_embeddings_and_output_weights=not getattr(args, "untie_embeddings_and_output_weights", True),
        position_embedding_type=getattr(args, "position_embedding_type", "rope"),
        rotary_percent=getattr(args, "rotary_percent", 1.0),
        rotary_base=int(getattr(args, "rotary_base", LLAMA2_ROPE_THETA)),
        # Llama 3.1 (Megatron-LM --use-rope-scaling); low/high frequency factors and original context are
        # megatron-core's defaults, which are Llama 3.1's (checkpoints.megatron.rope_of refuses other factors)
        rope_scaling=bool(getattr(args, "use_rope_scaling", False)),
        rope_scaling_factor=float(getattr(args, "rope_scaling_factor", None) or 8.0),
    )


class MegatronBackend(Backend):
    name = "megatron"
    spec = "local"  # the megatron-core layer spec that runs (option "spec")

    def load(self) -> None:
        import_megatron_core()
        from megatron.core import parallel_state, tensor_parallel

        checkpoint, device = self.checkpoint, self.device.type
        spec = self.spec = self.options.get("spec", "local")
        layer_spec = _layer_spec(spec, device, checkpoint)
        torch_dist = mg_ckpt.megatron_format(checkpoint) == "torch_dist"
        args, padded, load_state = self._open_torch_dist() if torch_dist else self._open_legacy()
        self.check_vocab(self.vocab_size)  # the TRUE vocab; the padded rows are never scored
        self.max_length = self.requested_max_length or int(getattr(args, "seq_length", None) or args.max_position_embeddings)

        self.heads_per_rank = int(args.num_attention_heads) // self.tp
        # local spec: unfused attention holds [b * heads, T, T] scores in the compute dtype, then fp32 for
        # the softmax (FusedScaleMaskSoftmax's torch path) and a cast back: about 12 bytes per element;
        # TE's fused attention never holds them whole
        self.score_bytes = 12 if spec == "local" else 0

        self.rank, world = init_distributed(device)
        if world != self.tp:
            raise UserError(f"{checkpoint}: TP {self.tp} needs {self.tp} processes, got {world}; "
                            f"launch with `parity.backends.worker.launch(job, {self.tp})`")
        if device == "cpu":
            from parity.backends import cpu_shims

            cpu_shims.apply()
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=self.tp)
        if device == "cuda":
            tensor_parallel.model_parallel_cuda_manual_seed(getattr(args, "seed", MEGATRON_SEED))

        self.model = build_gpt(args, self.tp, padded, torch_dtype(self.dtype), device, layer_spec)
        # legacy: MEGATRON_KEYS' names renamed for the spec; torch_dist: the model's own sharded names.
        # _extra_state entries (fp8 metadata of TE layers) are metadata, never weights
        missing, unexpected = self.model.load_state_dict(load_state(), strict=False)
        missing = [k for k in missing if not k.endswith(mg_ckpt.EXTRA_STATE)]
        if missing or unexpected:
            raise UserError(f"{checkpoint}: rank {self.rank} shard does not fit GPTModel (missing "
                            f"{missing[:3]}, unexpected {unexpected[:3]}); re-convert the checkpoint")
        self.model.to(self.device).eval()
        # Float16Module: module.bfloat16() / .half(). fp64 (parity's judge; Megatron-LM has no fp64 mode) is
        # the same whole-module cast, so the local spec's RMSNorm weights (made in fp32) compute in fp64 too
        if self.model.config.bf16 or self.model.config.fp16 or self.dtype == "fp64":
            self.model.to(torch_dtype(self.dtype))

    def details(self) -> dict:
        return {"spec": self.spec}

    def _open_legacy(self):
        """(args, stored vocab rows, this rank's state loader): TP must be the shard count; pipeline
        stages are merged into one model."""
        files = mg_ckpt.LegacyFiles(self.checkpoint)
        args, shards = files.args, files.tp
        tp = self.tp = self.tp or shards
        if tp != shards:
            raise UserError(f"{self.checkpoint}: checkpoint has {shards} tensor-parallel shards but TP {tp} was "
                            f"requested; convert with --target-tp {tp} or run with TP {shards}")
        heads, groups = args.num_attention_heads, mg_ckpt.kv_groups(args)
        if heads % tp or groups % tp:
            raise UserError(f"{self.checkpoint}: TP {tp} does not divide {heads} heads / {groups} kv groups")
        self.vocab_size = mg_ckpt.true_vocab(args, mg_ckpt.find_tokenizer(files.dir, args), files.file(0))
        return args, int(args.padded_vocab_size), lambda: mg_ckpt.named_for(files.load_rank(self.rank), self.spec)

    def _open_torch_dist(self):
        """(args, vocab rows padded for the run's TP, this rank's state loader): any valid TP, default
        the size's."""
        from parity.checkpoints.torch_dist import TorchDistSource

        src = TorchDistSource(self.checkpoint)  # checks the whole directory, reads no tensor
        if missing := src.missing_extra_state():
            raise UserError(f"{src.base / '.metadata'}: lacks {missing[0]!r} ({len(missing)} missing); "
                            f"megatron-core's loader requires the linear layers' _extra_state objects")
        args, self.vocab_size = src.args, src.spec.vocab
        self.tp = self.tp or src.spec.size.tp
        mg_ckpt.check_tp(src.spec, self.tp, str(self.checkpoint))
        # Megatron-LM pads for the run's TP (build_tokenizer), not for the TP that wrote the checkpoint
        padded = mg_ckpt.padded_vocab(self.vocab_size, self.tp, int(getattr(
            args, "make_vocab_size_divisible_by", mg_ckpt.MAKE_VOCAB_DIVISIBLE_BY)))
        return args, padded, lambda: self._load_torch_dist(src.base)

    def _load_torch_dist(self, base) -> dict:
        """This rank's state_dict by megatron-core's dist_checkpointing.load, as Megatron-LM calls it."""
        from megatron.core import dist_checkpointing, parallel_state
        from torch.distributed.checkpoint.api import CheckpointException

        from parity.checkpoints import dcp

        metadata = {"singleton_local_shards": False,  # Megatron-LM's own choice (_build_sharded_state_dict_metadata)
                    "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
        sharded = {k: v for k, v in self.model.sharded_state_dict(metadata=metadata).items()
                   if not k.endswith(mg_ckpt.EXTRA_STATE)}
        try:
            with dcp.safe_metadata(), warnings.catch_warnings():
                # megatron-core's loader calls torch APIs torch has deprecated: its news, not the user's
                warnings.simplefilter("ignore", FutureWarning)
                return dist_checkpointing.load({"model": sharded}, str(base))["model"]
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            if isinstance(e, UserError):
                raise
            reason = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
            raise UserError(f"{base}: megatron-core cannot load this torch_dist checkpoint ({reason})") from None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        position_ids = torch.arange(t, device=tokens.device)[None].expand(b, t)
        # the local spec gets an explicit mask (megatron-core's default one is built on "cuda"); TE's fused
        # attention applies its causal mask type itself, as with Megatron-LM's
        # --no-create-attention-mask-in-dataloader
        mask = causal_mask(t, tokens.device) if self.spec == "local" else None
        # parallel_output: each rank gets its vocab slice [b, t, padded_vocab / tp]
        local = self.model(tokens, position_ids, mask, runtime_gather_output=False)
        if self.tp > 1:  # megatron's own gather allocates on CUDA; all_gather works on gloo and nccl
            import torch.distributed as dist
            from megatron.core import parallel_state

            parts = [torch.empty_like(local) for _ in range(self.tp)]
            dist.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            local = torch.cat(parts, dim=-1)
        return local[..., :self.vocab_size]  # the padded vocab rows are never scored
