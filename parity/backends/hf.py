"""Hugging Face stack: transformers' LlamaForCausalLM, loaded with from_pretrained from an HF directory.

On one device the model is loaded and moved there. With several GPUs (the worker's own, by
CUDA_VISIBLE_DEVICES) accelerate spreads the layers over them: the device map is transformers' own
"auto" computation (balanced over the GPUs, layers never split), sized from these GPUs' free memory
only, and refused when it would put layers on the CPU or disk instead of running them on GPUs.

forward runs the inner LlamaModel, keeps the wanted positions on the hidden states' device, then the
lm_head: the same operations as LlamaForCausalLM.forward with logits_to_keep, but with several GPUs
accelerate's hook on the top module would move a keep-index tensor to the first GPU while the final
norm's output lives on the last one.
"""

from __future__ import annotations

import torch

from parity.backends.base import Backend
from parity.backends.dist import rank_from_env
from parity.dtypes import torch_dtype
from parity.errors import UserError
from parity.io import read_json


def plan_device_map(config, dtype: torch.dtype, gpu_bytes: dict[int, int], where) -> dict:
    """transformers' "auto" device map of a model of `config` over GPUs with these free bytes (no CPU, no
    disk); a map that would still offload anything is refused."""
    from transformers import LlamaForCausalLM
    from transformers.integrations.accelerate import get_balanced_memory, infer_auto_device_map

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):  # shapes and dtypes only, no memory
            skeleton = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    no_split = skeleton._no_split_modules
    budget = get_balanced_memory(skeleton, max_memory=dict(gpu_bytes), no_split_module_classes=no_split)
    device_map = dict(infer_auto_device_map(skeleton, max_memory=budget, no_split_module_classes=no_split))
    offloaded = [name or "the whole model" for name, dev in device_map.items() if dev in ("cpu", "disk")]
    if offloaded:
        gib = sum(gpu_bytes.values()) / 2**30
        more = f" and {len(offloaded) - 1} more" if len(offloaded) > 1 else ""
        raise UserError(f"{where}: does not fit on the {len(gpu_bytes)} GPU(s) this worker has ({gib:.1f} GiB "
                        f"free); accelerate would offload {offloaded[0]}{more} to CPU/disk; give the size more "
                        f"GPUs or run it in a smaller --dtype")
    return device_map


class HFBackend(Backend):
    name = "hf"

    def load(self) -> None:
        from safetensors import SafetensorError
        from transformers import LlamaConfig, LlamaForCausalLM

        config_path = self.checkpoint / "config.json"
        if not config_path.is_file():
            raise UserError(f"{config_path}: not found; point the hf backend at a converted HF directory")
        self.vocab_size = int(read_json(config_path, "HF config")["vocab_size"])
        self.check_vocab(self.vocab_size)
        dtype = torch_dtype(self.dtype)
        # TP for HF means "spread over the GPUs this worker was given" (parity.gpus hands out the size's TP)
        several_gpus = self.device.type == "cuda" and torch.cuda.device_count() > 1
        kwargs = {}
        try:
            if several_gpus:
                free = {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
                kwargs["device_map"] = plan_device_map(LlamaConfig.from_pretrained(self.checkpoint), dtype, free,
                                                       self.checkpoint)
            self.model = LlamaForCausalLM.from_pretrained(self.checkpoint, dtype=dtype, **kwargs)
        except (OSError, ValueError, SafetensorError) as e:
            raise UserError(f"{self.checkpoint}: cannot load HF checkpoint ({str(e).splitlines()[0][:200]})") from None
        if not several_gpus:
            self.model.to(self.device)
        self.model.eval()
        self.max_length = self.requested_max_length or int(self.model.config.max_position_embeddings)
        self.device = self.model.get_input_embeddings().weight.device
        self.rank = rank_from_env()  # one process normally; under a launcher only rank 0 writes

    supports_keep = True
    supports_shared_context = True

    def devices_in_use(self) -> list[torch.device]:
        return sorted({p.device for p in self.model.parameters()}, key=str)

    def details(self) -> dict:
        device_map = getattr(self.model, "hf_device_map", None)
        return {"device_map": _count(device_map)} if device_map and len(set(device_map.values())) > 1 else {}

    def forward_shared_context(self, context: torch.Tensor, continuations: torch.Tensor):
        # transformers' own kv cache: the context once, then every choice's tokens against a copy of it
        out = self.model(input_ids=context, use_cache=True, logits_to_keep=1)
        last = out.logits[0, -1, :self.vocab_size]
        if continuations.shape[1] == 0:
            return last, continuations.new_zeros((*continuations.shape, self.vocab_size), dtype=last.dtype)
        cache = out.past_key_values
        for layer in cache.layers:
            layer.batch_repeat_interleave(continuations.shape[0])
        more = self.model(input_ids=continuations, past_key_values=cache, use_cache=True).logits
        return last, more[..., :self.vocab_size]

    def forward(self, tokens: torch.Tensor, keep: list[int] | None = None) -> torch.Tensor:
        # LlamaForCausalLM.forward's steps (inner model, slice_logits_to_keep, lm_head), with the kept
        # positions indexed on the device the hidden states are on
        hidden = self.model.model(input_ids=tokens, use_cache=False).last_hidden_state
        if keep is not None:
            hidden = hidden[:, torch.tensor(keep, device=hidden.device), :]
        return self.model.lm_head(hidden)[..., :self.vocab_size]


def _count(device_map: dict) -> dict[str, int]:
    """Device -> how many device-map entries (decoder layers, embeddings, norm, head) it holds."""
    out: dict[str, int] = {}
    for dev in device_map.values():
        out[str(dev)] = out.get(str(dev), 0) + 1
    return dict(sorted(out.items()))
