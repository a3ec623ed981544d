"""The CPU path for megatron-core 0.16's CUDA assumptions. Applied only when the device is cpu.

megatron-core runs inference on CPU once these are handled (docs/architecture.md, "CPU shims"):
1. RotaryEmbedding.get_emb moves inv_freq to torch.cuda.current_device() on the first forward.
2. The default causal mask is built on "cuda" when no mask is given: parity.backends.megatron always
   passes an explicit mask (megatron.causal_mask), so nothing is patched for it here.
3. DotProductAttention forks the CUDA RNG tracker around attention dropout: we install megatron's own
   inference RNG tracker, whose fork() is a no-op (dropout is 0 and the model is in eval anyway).
4. GlobalMemoryBuffer.get_tensor (attention score buffer) allocates on torch.cuda.current_device().
megatron-core's torch_dist save (dist_checkpointing.save: parity never calls it, the tests that prove
parity's reader against megatron's own writer do) has two more:
5. FileSystemWriterAsync.preload_tensors(non_blocking=True) ends with torch.cuda.synchronize(): on CPU
   the copy is synchronous anyway, so it runs with non_blocking=False.
6. save_state_dict_async_finalize builds its failure flag on torch.cuda.current_device(): as 1 and 4.
(megatron-core's torch_dist load needs none.)

For 1, 4 and 6 the CUDA device lookup is answered with "cpu" for the duration of those calls only,
so megatron's own code runs unchanged and nothing else sees a fake CUDA device.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_APPLIED = False


@contextlib.contextmanager
def current_device_is_cpu():
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.current_device = original


def _on_cpu(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with current_device_is_cpu():
            return method(*args, **kwargs)
    return wrapper


def apply() -> None:
    """Patch megatron-core for CPU execution (idempotent; one backend per process, so never undone)."""
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch_strategy
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.utils import GlobalMemoryBuffer

    RotaryEmbedding.get_emb = _on_cpu(RotaryEmbedding.get_emb)  # 1
    GlobalMemoryBuffer.get_tensor = _on_cpu(GlobalMemoryBuffer.get_tensor)  # 4
    mcore_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)  # 3
    preload = filesystem_async.FileSystemWriterAsync.preload_tensors  # 5

    def preload_tensors(write_buckets, non_blocking=True):
        return preload(write_buckets, non_blocking=False)

    filesystem_async.FileSystemWriterAsync.preload_tensors = staticmethod(preload_tensors)
    # 6: strategies/torch.py imported the function by name, so that name is the one to wrap
    mcore_torch_strategy.save_state_dict_async_finalize = _on_cpu(mcore_torch_strategy.save_state_dict_async_finalize)
    _APPLIED = True

