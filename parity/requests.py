"""The contract between tasks and backends: token-id requests in, per-request scores out.

Tasks turn documents into (context, continuation) strings and tokenize them once (parity.tasks);
every backend receives exactly these ids, so all stacks see identical inputs. A request's hash is
derived from its ids alone: equal hashes across backends prove they scored the same thing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from parity.errors import UserError
from parity.io import write_jsonl


@dataclass(frozen=True)
class Request:
    context: tuple[int, ...]  # starts with BOS (1)
    continuation: tuple[int, ...]  # at least one token

    @cached_property  # asked for many times per request (dedup, digests, per-sample rows): hash once
    def hash(self) -> str:
        payload = json.dumps([self.context, self.continuation], separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {"hash": self.hash, "context": list(self.context), "continuation": list(self.continuation)}


@dataclass(frozen=True)
class Score:
    loglik: float  # sum of log p(continuation tokens | everything before)
    is_greedy: bool  # every continuation token was the argmax


def write_requests(path: str | Path, requests: list[Request]) -> None:
    write_jsonl(path, (r.to_json() for r in requests))


def read_requests(path: str | Path) -> list[Request]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                d = json.loads(line)
                out.append(Request(tuple(d["context"]), tuple(d["continuation"])))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{path}:{n}: malformed request line ({e})") from None
    return out


def write_scores(path: str | Path, requests: list[Request], scores: list[Score]) -> None:
    write_jsonl(path, ({"hash": r.hash, "loglik": s.loglik, "is_greedy": s.is_greedy}
                       for r, s in zip(requests, scores, strict=True)))


def read_scores(path: str | Path) -> dict[str, Score]:
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            out[d["hash"]] = Score(d["loglik"], d["is_greedy"])
    return out
