"""The backend interface: token-id requests in, (log-likelihood, is_greedy) out.

In the spirit of lm-eval's `LM`, but a backend only has to load its stack and implement `forward`
(token ids -> logits over the true vocabulary). Everything that decides *which* numbers are computed
lives here, once, so the three stacks are scored by identical code:

- input of a request = (context + continuation)[-(max_length + 1):][:-1], exactly lm-eval's
  `_loglikelihood_tokens`: too-long inputs lose tokens on the left, the last continuation token is
  predicted but never fed;
- requests with the same input are computed by one forward pass (lm-eval's "one forward per context"
  for single-token choices such as MMLU's " A".." D" is the common case of this);
- inputs are sorted by length (longest first, so running out of memory happens at once; the noise floor
  also runs shortest first) and batched with right padding, which a causal model needs no attention mask for;
- "auto" batches are bounded by tokens (linear memory) and, on CUDA, by rows x length^2 for stacks whose
  attention holds the whole score matrix (quadratic memory); a batch that still runs out of GPU memory
  is halved and retried (the same requests, so the same results), and later batches get half the budget;
- log_softmax in fp32 whatever the compute dtype (fp64 in an fp64 run: the judge keeps its digits);
  results come back in request order.
"""

from __future__ import annotations

import os
import socket
import sys
from abc import ABC, abstractmethod
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from parity.backends.dist import agreed_min, gather_objects, ranks_share_gpus
from parity.errors import UserError
from parity.requests import Request, Score

# "auto" batch size: the number of (padded) tokens per forward pass. Bounded by tokens, not rows, so a
# batch of long inputs and a batch of short ones cost about the same memory.
AUTO_TOKENS_PER_BATCH = {"cpu": 1024, "cuda": 32768}  # cpu: measured best on 2 cores (bench/)
AUTO_MAX_ROWS = 64
# Share of the GPU memory free after loading (less a kv cache's worst case) that "auto" batches may fill
# with attention scores; the rest is for activations, logits and the allocator's slack.
SCORES_SHARE = 0.5
PAD_ID = 0  # never attended to by a real token (right padding + causal attention), any id would do


class Backend(ABC):
    """One loaded model of one stack. Subclasses implement load() and forward(); load() sets
    vocab_size and max_length (and device / rank where the stack decides them)."""

    name: str = "base"
    vocab_size: int  # the tokenizer's (true) vocabulary: logits beyond it are never returned
    max_length: int  # longest input fed to the model (lm-eval's max_length)
    device: torch.device = torch.device("cpu")
    dtype: str = "fp32"  # compute dtype (parity.dtypes)
    max_batch_rows: int | None = None  # a hard cap some stacks have (Meta's kv cache)
    rank: int = 0  # writes results only when 0; all ranks compute
    supports_keep: bool = False  # forward(tokens, keep) returns logits only at the positions in keep
    supports_shared_context: bool = False  # implements forward_shared_context (a kv cache)
    # Memory facts for "auto" batches on CUDA (set by load() where they apply):
    score_bytes: int = 0  # bytes per attention score element per head at peak (0: scores never held whole)
    heads_per_rank: int = 1  # attention heads this rank computes
    cache_bytes_per_token: int = 0  # per-token state a stack preallocates (Meta's kv cache), see reserve()
    score_budget: int | None = None  # bytes attention scores may take (measured on CUDA; None: no bound)
    options: dict = {}  # adapter-specific options (Job.options), e.g. megatron's {"spec": "te"}
    oom_backoffs: int = 0  # batches halved after running out of GPU memory
    # batch composition: "longest" first (the default) or "shortest" first, which puts every input beside
    # other neighbours and pads it to other widths (the noise floor's "reversed" perturbation, parity.floor)
    batch_order: str = "longest"
    _shrink: float = 1.0  # "auto" / fixed batch rows are scaled by this after an out-of-memory

    def __init__(self, checkpoint: str | Path, *, tp: int | None = None, device: str = "cpu",
                 dtype: str = "fp32", tokenizer_vocab: int | None = None, max_length: int | None = None,
                 options: dict | None = None):
        """The one constructor every adapter shares:
        checkpoint       directory in the adapter's format
        tp               model/tensor-parallel ranks to run with (None: what the checkpoint is split for)
        device, dtype    where and in what (parity.dtypes) the model computes
        tokenizer_vocab  vocabulary of the tokenizer the requests were built with: must equal the model's
        max_length       longest input fed to the model (None: the checkpoint's context length)
        options          adapter-specific options (each adapter names the ones it reads)
        """
        self.checkpoint = Path(checkpoint)
        self.tp, self.dtype, self.tokenizer_vocab = tp, dtype, tokenizer_vocab
        self.device = torch.device(device)
        self.requested_max_length = max_length
        self.options = dict(options or {})
        self.load()
        self._measure_memory()

    @abstractmethod
    def load(self) -> None:
        """Load the stack from self.checkpoint; set vocab_size and max_length (check_vocab first)."""

    def check_vocab(self, checkpoint_vocab: int) -> None:
        """The requests' tokenizer must be the checkpoint's: ids beyond the vocab or a shifted vocab would
        score garbage silently."""
        if self.tokenizer_vocab is not None and int(self.tokenizer_vocab) != int(checkpoint_vocab):
            raise UserError(f"{self.checkpoint}: checkpoint vocab {checkpoint_vocab} != tokenizer vocab "
                            f"{self.tokenizer_vocab} ({self.name}); build the requests with this checkpoint's "
                            f"tokenizer.model")

    @abstractmethod
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens LongTensor[B, T] on self.device -> logits FloatTensor[B, T, vocab_size] (any float dtype).
        With supports_keep, also forward(tokens, keep: list of positions) -> [B, len(keep), vocab_size]."""

    def reserve(self, tokens: int) -> None:
        """Preallocate per-token state for batches of up to `tokens` tokens (rows x width); the worker calls
        it once with the job's largest batch (largest_batch). Stacks without such state ignore it."""

    def devices_in_use(self) -> list[torch.device]:
        """The devices holding this rank's weights (several for a model spread over GPUs)."""
        return [self.device]

    def details(self) -> dict:
        """Adapter facts worth recording with the results (e.g. which megatron layer spec ran)."""
        return {}

    # ---- shared code -------------------------------------------------------------------------------

    def _measure_memory(self) -> None:
        """On CUDA, the attention-score budget of "auto" batches: a share of the memory free after loading,
        less the worst case of preallocated per-token state, the same on every rank (agreed_min)."""
        if self.device.type != "cuda" or not self.score_bytes:
            return
        free = min(torch.cuda.mem_get_info(d)[0] for d in self.devices_in_use() if d.type == "cuda")
        if ranks_share_gpus():  # several ranks on one GPU (gloo): they share its free memory
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            free //= max(1, -(-local // max(1, torch.cuda.device_count())))
        worst_cache = self.cache_bytes_per_token * max(AUTO_TOKENS_PER_BATCH["cuda"], self.max_length)
        self.score_budget = max(0, int((agreed_min(free, self.device) - worst_cache) * SCORES_SHARE))

    def ran_on(self) -> dict:
        """Where this model runs, over all its ranks (a collective: every rank calls it): device, dtype,
        ranks, hosts and GPU models with their counts, plus the adapter's details()."""
        host = socket.gethostname()
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        mine = []
        for d in self.devices_in_use():
            if d.type == "cuda":
                i = d.index if d.index is not None else torch.cuda.current_device()
                mine.append((host, visible[i] if i < len(visible) else str(i), torch.cuda.get_device_name(i)))
        everyone = gather_objects((host, mine))
        gpus = {(h, g): name for _, m in everyone for h, g, name in m}  # a GPU shared by ranks counts once
        out = {"device": self.device.type, "dtype": self.dtype, "ranks": len(everyone),
               "hosts": sorted({h for h, _ in everyone})}
        if gpus:
            out["gpus"] = dict(sorted(Counter(gpus.values()).items()))
        return out | self.details()

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [T, vocab_size] in fp32 on cpu for one sequence (diagnostics, logits parity tests)."""
        tokens = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        return self._checked_forward(tokens)[0].float().cpu()

    def batch_rows(self, batch_size: int | str, length: int) -> int:
        if batch_size == "auto":
            budget = AUTO_TOKENS_PER_BATCH.get(self.device.type, AUTO_TOKENS_PER_BATCH["cpu"])
            rows = max(1, min(AUTO_MAX_ROWS, budget // max(1, length)))
            if self.score_budget is not None and self.score_bytes:  # scores grow with length^2
                per_row = self.score_bytes * self.heads_per_rank * length * length
                rows = max(1, min(rows, self.score_budget // per_row))
        else:
            rows = int(batch_size)
            if rows < 1:
                raise UserError(f"batch size must be a positive integer or 'auto', got {batch_size!r}")
        rows = max(1, int(rows * self._shrink))
        return min(rows, self.max_batch_rows) if self.max_batch_rows else rows

    def largest_batch(self, requests: list[Request], batch_size: int | str = "auto") -> int:
        """Tokens (rows x width) of the largest batch that scoring `requests` runs (before any halving)."""
        keys = list(self._model_inputs(requests, check=False)[0])
        order = self._order(keys)
        pos = most = 0
        while pos < len(order):
            chunk = self._chunk(keys, order, pos, batch_size)
            most = max(most, len(chunk) * max(len(keys[k]) for k in chunk))
            pos += len(chunk)
        return most

    def _order(self, keys: list) -> list[int]:
        """The order inputs are batched in: longest first (so running out of memory happens at once), or
        with batch_order "shortest", the reverse."""
        order = sorted(range(len(keys)), key=lambda k: (-len(keys[k]), keys[k]))
        return order[::-1] if self.batch_order == "shortest" else order

    def _chunk(self, keys: list, order: list[int], pos: int, batch_size) -> list[int]:
        """The next batch: as many rows as the longest input among them allows."""
        chunk = order[pos:pos + self.batch_rows(batch_size, len(keys[order[pos]]))]
        rows = self.batch_rows(batch_size, max(len(keys[k]) for k in chunk))  # shortest first: a longer one
        return chunk[:rows]  #                                                  later in the chunk sets the bound

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Request], batch_size: int | str = "auto",
                      progress: Callable[[int], None] | None = None) -> list[Score]:
        """Score every request; `progress(n)` is called with the number of requests just finished."""
        if not self.supports_shared_context:
            return self._loglikelihood_batched(requests, batch_size, progress)
        groups, rest = shared_context_groups(requests, self.max_length)
        scores: list[Score | None] = [None] * len(requests)
        for members in groups:
            for i, score in zip(members, self._score_shared_context([requests[i] for i in members])):
                scores[i] = score
            if progress:
                progress(len(members))
        for i, score in zip(rest, self._loglikelihood_batched([requests[i] for i in rest], batch_size, progress)):
            scores[i] = score
        return scores  # type: ignore[return-value]

    def _score_shared_context(self, members: list[Request]) -> list[Score]:
        """Choices that share a context (hellaswag's endings): the context runs once, its kv cache is
        repeated for every choice, and only the choices' own tokens run again."""
        ctx = torch.tensor([members[0].context], dtype=torch.long, device=self.device)
        conts = [r.continuation for r in members]
        width = max(len(c) for c in conts) - 1
        rest = torch.full((len(members), width), PAD_ID, dtype=torch.long)
        for row, c in enumerate(conts):
            rest[row, :len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
        last, more = self.forward_shared_context(ctx, rest.to(self.device))
        out = []
        for row, c in enumerate(conts):
            logits = torch.cat([last[None], more[row, :len(c) - 1]]) if len(c) > 1 else last[None]
            lp = _widened(logits, self.dtype).log_softmax(-1)
            target = torch.tensor(c, dtype=torch.long, device=lp.device)
            out.append(Score(float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
        return out

    def forward_shared_context(self, context: torch.Tensor, continuations: torch.Tensor):
        """context [1, C], continuations [k, W] (right-padded, each choice's tokens but its last) ->
        (logits [V] at the context's last position, logits [k, W, V] at the continuation positions)."""
        raise NotImplementedError

    def _model_inputs(self, requests: list[Request], check: bool = True):
        """Unique model inputs (input -> index), and for each request: (input index, continuation length)."""
        inputs: dict[tuple[int, ...], int] = {}
        plan: list[tuple[int, int]] = []
        for r in requests:
            if check and (not r.continuation or len(r.continuation) > self.max_length):
                raise UserError(f"request {r.hash}: continuation of {len(r.continuation)} tokens; "
                                f"it must have 1 to max_length={self.max_length} tokens")
            if check and (min(r.context + r.continuation) < 0 or max(r.context + r.continuation) >= self.vocab_size):
                raise UserError(f"request {r.hash}: token id outside the checkpoint's vocab "
                                f"(0..{self.vocab_size - 1}); build the requests with this checkpoint's "
                                f"tokenizer.model")
            inp = (r.context + r.continuation)[-(self.max_length + 1):][:-1]
            plan.append((inputs.setdefault(inp, len(inputs)), len(r.continuation)))
        return inputs, plan

    def _loglikelihood_batched(self, requests: list[Request], batch_size, progress) -> list[Score]:
        inputs, plan = self._model_inputs(requests)
        by_input: list[list[int]] = [[] for _ in inputs]
        for i, (k, _) in enumerate(plan):
            by_input[k].append(i)

        keys = list(inputs)
        order = self._order(keys)
        scores: list[Score | None] = [None] * len(requests)
        pos, retry_rows = 0, None
        while pos < len(order):
            chunk = self._chunk(keys, order, pos, batch_size)
            chunk = chunk[:min(len(chunk), retry_rows or len(chunk))]
            retry_rows = None
            width = max(len(keys[k]) for k in chunk)  # longest first: the first row
            batch = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
            for row, k in enumerate(chunk):
                batch[row, :len(keys[k])] = torch.tensor(keys[k], dtype=torch.long)
            # Only positions that predict a continuation token are needed. A backend that can skip the
            # output layer elsewhere (HF's logits_to_keep) computes just these: on a 32000-word vocab the
            # output layer and the logits it writes are most of a small model's cost.
            spans = {k: max(plan[i][1] for i in by_input[k]) for k in chunk}
            needed = sorted({p for k in chunk for p in range(len(keys[k]) - spans[k], len(keys[k]))})
            keep = needed if self.supports_keep and len(needed) < width else None
            logits = self._forward_in_memory(batch.to(self.device), keep)
            if logits is None:  # out of GPU memory: the same requests again, in half the rows
                retry_rows = self._halve(len(chunk), width)
                continue
            pos += len(chunk)
            column = {p: j for j, p in enumerate(keep)} if keep else None
            done = 0
            for row, k in enumerate(chunk):
                n, span = len(keys[k]), spans[k]
                cols = range(n - span, n)
                idx = [column[p] for p in cols] if column else list(cols)
                # log_softmax is row-wise: normalising only these rows gives the numbers of a full one;
                # fp32 whatever the compute dtype (fp64 stays fp64).
                logprobs = _widened(logits[row, idx], self.dtype).log_softmax(-1)
                for i in by_input[k]:
                    cont_len = plan[i][1]
                    cont = torch.tensor(requests[i].continuation[-cont_len:], dtype=torch.long,
                                        device=logprobs.device)
                    lp = logprobs[span - cont_len:]
                    scores[i] = Score(float(lp.gather(1, cont[:, None]).sum()),
                                      bool((lp.argmax(-1) == cont).all()))
                    done += 1
            if progress:
                progress(done)
        return scores  # type: ignore[return-value]

    def _forward_in_memory(self, tokens: torch.Tensor, keep: list[int] | None) -> torch.Tensor | None:
        """forward, or None when the GPU ran out of memory (the exception and the tensors its frames hold
        are gone when this returns, so a retry gets the memory back)."""
        try:
            return self._checked_forward(tokens, keep)
        except torch.OutOfMemoryError:
            pass
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return None

    def _halve(self, rows: int, width: int) -> int:
        """After an out-of-memory on rows x width: the rows to retry with; later batches get half the
        budget. At TP > 1 every rank holds the same shapes and runs out at the same operation, so all of
        them halve alike."""
        if rows == 1:
            raise UserError(f"{self.name}: out of GPU memory on a single input of {width} tokens on "
                            f"{self.device}; give the model more GPUs (TP) or run it in a smaller dtype")
        self._shrink /= 2
        self.oom_backoffs += 1
        if self.rank == 0:
            print(f"{self.name}: out of GPU memory on a batch of {rows} x {width} tokens; retrying the same "
                  f"requests in {rows // 2} rows (later batches: half the budget)", file=sys.stderr, flush=True)
        return rows // 2

    def _checked_forward(self, tokens: torch.Tensor, keep: list[int] | None = None) -> torch.Tensor:
        out = self.forward(tokens, keep) if keep is not None else self.forward(tokens)
        expect = (tokens.shape[0], len(keep) if keep is not None else tokens.shape[1], self.vocab_size)
        if tuple(out.shape) != expect:  # a wiring bug, not bad input: fail loudly
            raise RuntimeError(f"{self.name}: forward returned {tuple(out.shape)}, expected {expect}")
        return out


def _widened(logits: torch.Tensor, dtype: str) -> torch.Tensor:
    """Logits for log_softmax: fp32 at least, fp64 in an fp64 run (the judge), even from a stack that hands
    back fp32 logits (Meta's `.float()`): a sum of fp32 log-probabilities would cost the judge its digits."""
    wide = torch.float64 if dtype == "fp64" else torch.float32
    return logits.to(torch.promote_types(logits.dtype, wide))


def shared_context_groups(requests: list[Request], max_length: int) -> tuple[list[list[int]], list[int]]:
    """Indices of requests worth scoring with a shared context's kv cache: same context, at least two
    choices, some choice longer than one token (single-token choices already share one forward), and no
    truncation (a truncated input no longer starts with the whole context). The rest: plain batches."""
    by_ctx: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(requests):
        by_ctx.setdefault(r.context, []).append(i)
    groups, rest = [], []
    for members in by_ctx.values():
        conts = [requests[i].continuation for i in members]
        fits = all(len(requests[i].context) + len(c) - 1 <= max_length for i, c in zip(members, conts))
        if len(members) > 1 and max(map(len, conts)) > 1 and fits:
            groups.append(members)
        else:
            rest.extend(members)
    return groups, sorted(rest)
