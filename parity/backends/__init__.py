"""Inference stacks behind one interface (base.Backend), and the one table that names them.

Everything that lists backends (the `--backends` default and its allow-list, `--checkpoint SIZE:BACKEND`,
the worker, the conversion cache) derives from BACKENDS. Adding a backend = one adapter class (a
base.Backend subclass: `load()` + `forward()`) and one row here; a plug-in outside this package can
`register()` its row at import time.

Imports stay lazy: importing this package loads no model stack; a worker imports only its own adapter.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from parity.errors import UserError


@dataclass(frozen=True)
class BackendInfo:
    name: str
    adapter: str  # "module:Class" of its base.Backend subclass, imported only inside its worker
    format: str  # checkpoint format it reads (a key of parity.checkpoints.MARKERS); a size without a
    #              checkpoint of this format gets one converted from the size's Meta files
    default: bool = True  # in the default `--backends` set
    gpus: str = "ranks"  # GPUs a worker gets on cuda: "ranks" (one per rank: fairscale, megatron-core) or
    #                      "size" (one process spread over the size's TP GPUs: accelerate's device map)
    batches: bool = True  # scores through base.Backend's batching, so its batch composition can change
    #                       (`--noise-floor` perturbs it; a stack with fixed batches has no floor)


BACKENDS: dict[str, BackendInfo] = {b.name: b for b in [
    BackendInfo("meta", "parity.backends.meta:MetaBackend", "meta"),  # the reference
    BackendInfo("hf", "parity.backends.hf:HFBackend", "hf", gpus="size"),
    BackendInfo("megatron", "parity.backends.megatron:MegatronBackend", "megatron"),
]}


def register(info: BackendInfo) -> None:
    """Add (or replace) a backend row; for adapters that live outside this package."""
    BACKENDS[info.name] = info


def default_backends() -> list[str]:
    return [name for name, info in BACKENDS.items() if info.default]


def backend_info(name: str, where: str = "backend") -> BackendInfo:
    try:
        return BACKENDS[name]
    except KeyError:
        raise UserError(f"{where}: unknown backend {name!r}; known backends: {', '.join(BACKENDS)}") from None


def adapter_class(adapter: str):
    """The Backend subclass an "module:Class" path names (imported now: this loads its stack)."""
    module, _, cls = adapter.partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise UserError(f"backend adapter {adapter!r} cannot be imported ({e}); is its module on PYTHONPATH?") from None
