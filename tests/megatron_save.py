"""megatron-core's own torch_dist writer and reader on CPU with gloo, called as Megatron-LM calls them:
the megatron-core side of tests/test_torch_dist.py (not a test module; torchrun runs it).

    torchrun --nproc-per-node 2 tests/megatron_save.py LEGACY_TP1 LEGACY_TP2 PARITY_TORCH_DIST IDS OUT

Writer: for TP 2, then TP 1 (two data-parallel replicas, of which megatron-core writes one), build the
GPTModel the megatron backend builds, load the legacy checkpoint of that TP into it, and save OUT/tp{TP}
with dist_checkpointing.save({"args", "checkpoint_version", "iteration", "model":
model.sharded_state_dict(...), "rng_state", ...}). The args are made to look like Megatron-LM 0.16's:
vocab_size None (the vocabulary comes from the tokenizer), layernorm_epsilon instead of norm_epsilon,
megatron-core enums and a signal inside.
Reader, at TP 2: dist_checkpointing.load(model.sharded_state_dict(), PARITY_TORCH_DIST) into a fresh
model whose weights are NaN first; its logits for the token ids in IDS (a .pt) and those of the model
loaded from LEGACY_TP2 go to OUT/logits_tp2.pt.
One launch does all (each launch costs a minute on 2 cores, most of it imports and the writer's workers).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path


def megatron_lm_args(args, tp: int):
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    a = dict(vars(args))
    a["layernorm_epsilon"] = a.pop("norm_epsilon")
    a.update(vocab_size=None, ckpt_format="torch_dist", attention_backend=AttnBackend.auto,
             exit_signal=signal.SIGTERM, model_type=ModelType.encoder_or_decoder, tensor_model_parallel_size=tp)
    return type(args)(**a)


def logits(model, ids, tp: int):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from parity.backends.megatron import causal_mask

    tokens = ids[None]
    with torch.no_grad():
        local = model(tokens, torch.arange(tokens.shape[1])[None], causal_mask(tokens.shape[1], tokens.device),
                      runtime_gather_output=False)
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)[0]


def load_parity_torch_dist(args, path: Path, tp: int, vocab: int):
    """megatron-core's own reader on parity's writer's output, as Megatron-LM calls it."""
    import torch
    from megatron.core import dist_checkpointing, parallel_state

    from parity.backends.megatron import build_gpt
    from parity.checkpoints.megatron import padded_vocab

    model = build_gpt(args, tp, padded_vocab(vocab, tp), torch.float32, "cpu")
    for p in model.parameters():  # anything not loaded shows up as NaN
        p.data.fill_(float("nan"))
    md = {"singleton_local_shards": False, "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    state = dist_checkpointing.load({"model": model.sharded_state_dict(metadata=md)}, str(path / "release"))
    model.load_state_dict(state["model"], strict=True)
    return model.eval()


def save(legacy: Path, out: Path, tp: int):
    import random

    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from parity.backends.megatron import build_gpt
    from parity.checkpoints.megatron import LegacyFiles

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    files = LegacyFiles(legacy)
    model = build_gpt(files.args, tp, int(files.args.padded_vocab_size), torch.float32, "cpu")
    missing, unexpected = model.load_state_dict(files.load_rank(parallel_state.get_tensor_model_parallel_rank()),
                                                strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected, (missing, unexpected)

    # Megatron-LM's _build_sharded_state_dict_metadata (no distributed optimizer) and generate_state_dict
    dp = parallel_state.get_data_parallel_group(with_context_parallel=True)
    content = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    rng = ShardedObject("rng_state", [{"random_rng_state": random.getstate(), "torch_rng_state": torch.get_rng_state()}],
                        (1, tp), (0, parallel_state.get_tensor_model_parallel_rank()),
                        replica_id=parallel_state.get_data_parallel_rank())
    state = {"args": megatron_lm_args(files.args, tp), "checkpoint_version": 3.0, "iteration": 0,
             "model": model.sharded_state_dict(metadata={**content, "dp_cp_group": dp}),
             "rng_state": [rng], "num_floating_point_operations_so_far": 0}
    ckpt = out / "release"
    if dist.get_rank() == 0:
        ckpt.mkdir(parents=True)  # megatron-core's save needs the directory to exist
    dist.barrier()
    dist_checkpointing.save(state, str(ckpt), content_metadata=content)
    if dist.get_rank() == 0:
        (out / "latest_checkpointed_iteration.txt").write_text("release")
        shutil.copyfile(legacy / "tokenizer.model", out / "tokenizer.model")
    dist.barrier()
    return model.eval(), files.args


def main() -> None:
    from parity.backends import cpu_shims
    from parity.backends.dist import init_distributed

    import torch
    import torch.distributed as dist

    legacy_tp1, legacy_tp2, parity_td, ids, out = map(Path, sys.argv[1:6])
    init_distributed("cpu")
    cpu_shims.apply()  # shims 5 and 6 are the save path's
    ids = torch.load(ids)
    model, args = save(legacy_tp2, out / "tp2", 2)
    theirs = load_parity_torch_dist(args, parity_td, 2, int(args.vocab_size))
    result = {"legacy": logits(model, ids, 2), "parity_torch_dist": logits(theirs, ids, 2)}
    if dist.get_rank() == 0:
        torch.save(result, out / "logits_tp2.pt")
    save(legacy_tp1, out / "tp1", 1)
    dist.destroy_process_group()


if __name__ == "__main__":  # megatron-core's writer spawns worker processes, which re-import this file
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
