"""Hugging Face stack: transformers' LlamaForCausalLM, loaded with from_pretrained from an HF directory."""

from __future__ import annotations

import torch

from parity.backends.base import Backend
from parity.backends.dist import rank_from_env
from parity.dtypes import torch_dtype
from parity.errors import UserError
from parity.io import read_json


class HFBackend(Backend):
    name = "hf"

    def load(self) -> None:
        from safetensors import SafetensorError
        from transformers import LlamaForCausalLM

        config_path = self.checkpoint / "config.json"
        if not config_path.is_file():
            raise UserError(f"{config_path}: not found; point the hf backend at a converted HF directory")
        self.vocab_size = int(read_json(config_path, "HF config")["vocab_size"])
        self.check_vocab(self.vocab_size)
        # TP for HF means "spread over the GPUs there are": accelerate's device_map places the layers.
        several_gpus = self.device.type == "cuda" and torch.cuda.device_count() > 1
        kwargs = {"device_map": "auto"} if several_gpus else {}
        try:
            self.model = LlamaForCausalLM.from_pretrained(self.checkpoint, dtype=torch_dtype(self.dtype), **kwargs)
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
        # logits_to_keep: transformers' own way to run lm_head on some positions only (0 = all)
        kw = {"logits_to_keep": torch.tensor(keep, device=tokens.device)} if keep is not None else {}
        return self.model(input_ids=tokens, use_cache=False, **kw).logits[..., :self.vocab_size]
