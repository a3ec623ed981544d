"""The tracing mode of a loaded backend: forward hooks on its own model record every boundary, in the
canonical layout, for a few token sequences.

Each sequence runs alone (batch 1, no padding) through the backend's ordinary forward(); its boundaries
are concatenated over sequences along the token axis. Under tensor parallelism every rank records its
own block and the blocks are gathered in rank order (all ranks must call capture(); each gets the full
tensors). Half-precision activations are stored as fp32 (exact), fp32 / fp64 as they are.
"""

from __future__ import annotations

import importlib

import torch

from parity.checkpoints.spec import unpermute
from parity.errors import UserError
from parity.trace.boundaries import AFTER, BEFORE, LAYER_KINDS, boundary_names
from parity.trace.stacks import StackTrace, Tap, stack_trace


def canonical(x: torch.Tensor, tap: Tap, head_dim: int) -> torch.Tensor:
    """One captured tensor (batch 1) -> [T, ...] in Meta's layout (this rank's block under TP)."""
    if tap.layout == "BT":
        x = x[0]
    elif tap.layout == "TB":
        x = x[:, 0]
    else:  # "BHT": [B, heads, T, hd]
        x = x[0].transpose(0, 1)
    t = x.shape[0]
    if tap.heads or tap.rotate_half:
        x = x.reshape(t, -1, head_dim)
    if tap.rotate_half:  # the same row permutation the checkpoints' wq / wk went through, undone per token
        h = x.shape[1]
        x = unpermute(x.reshape(t, h * head_dim).T.contiguous(), h).T.reshape(t, h, head_dim)
    return x


def _stored(x: torch.Tensor) -> torch.Tensor:
    x = x.detach()
    if x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()
    return x.to("cpu", copy=True).contiguous()


class Tracer:
    """Hooks on backend.model for the duration of a `with` block."""

    def __init__(self, backend):
        self.backend = backend
        self.trace: StackTrace = stack_trace(backend.name)
        model = getattr(backend, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise UserError(f"backend {backend.name!r} cannot be traced: it exposes no torch model as .model")
        self.model = model
        try:
            self.n_layers = len(model.get_submodule(self.trace.layers))
        except AttributeError:
            raise UserError(f"backend {backend.name!r} cannot be traced: its model has no {self.trace.layers!r} "
                            f"(a stack version parity.trace.stacks does not know)") from None
        self.head_dim = int(self.trace.head_dim(model))
        self.names = boundary_names(self.n_layers)
        self.parts: dict[str, list[torch.Tensor]] = {}
        self._handles: list = []
        self._patched: list[tuple[object, str, object]] = []
        self._scope: int | None = None

    # ---- hooks -------------------------------------------------------------------------------------
    def _module(self, path: str) -> torch.nn.Module:
        try:
            m = self.model.get_submodule(path)
        except AttributeError:
            raise UserError(f"backend {self.backend.name!r} cannot be traced: its model has no module {path!r} "
                            f"(a stack version or layer spec parity.trace.stacks does not know)") from None
        if type(m).__name__ in self.trace.fused_norm:
            raise UserError(f"backend {self.backend.name!r} cannot be traced: {path} is a {type(m).__name__} "
                            f"(this layer spec fuses it into the next linear layer); use the local layer spec")
        return m

    def _record(self, name: str, tap: Tap, x) -> None:
        if isinstance(x, (tuple, list)):
            x = x[tap.index]
        self.parts.setdefault(name, []).append(_stored(canonical(x, tap, self.head_dim)))

    def _attach(self, name: str, tap: Tap, module: torch.nn.Module, layer: int | None) -> None:
        if tap.hook == "out":
            self._handles.append(module.register_forward_hook(lambda m, a, out: self._record(name, tap, out)))
        elif tap.hook == "in":
            self._handles.append(module.register_forward_pre_hook(lambda m, args: self._record(name, tap, args)))
        elif tap.hook == "call":  # the function's outputs are this layer's while the module runs
            def enter(m, args, layer=layer):
                self._scope = layer

            def leave(m, args, out):
                self._scope = None
            self._handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
        else:
            raise ValueError(f"unknown hook {tap.hook!r}")

    def _wrap(self, function: str, taps: list[tuple[str, Tap]]) -> None:
        mod_name, _, attr = function.partition(":")
        mod = importlib.import_module(mod_name)
        original = getattr(mod, attr, None)
        if original is None:
            raise UserError(f"backend {self.backend.name!r} cannot be traced: {function} not found "
                            f"(a stack version parity.trace.stacks does not know)")

        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            if self._scope is not None:
                for kind, tap in taps:
                    self._record(f"layers.{self._scope}.{kind}", tap, out)
            return out

        setattr(mod, attr, wrapper)
        self._patched.append((mod, attr, original))

    def __enter__(self):
        try:
            functions: dict[str, list[tuple[str, Tap]]] = {}
            for kind, tap in self.trace.taps.items():
                if kind in LAYER_KINDS:
                    for i in range(self.n_layers):
                        self._attach(f"layers.{i}.{kind}", tap, self._module(tap.module.format(i=i)), i)
                elif kind in BEFORE + AFTER:
                    self._attach(kind, tap, self._module(tap.module), None)
                else:
                    raise ValueError(f"{self.backend.name}: unknown boundary kind {kind!r} in its trace row")
                if tap.hook == "call":
                    functions.setdefault(tap.function, []).append((kind, tap))
            for function, taps in functions.items():
                self._wrap(function, taps)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        for mod, attr, original in reversed(self._patched):
            setattr(mod, attr, original)
        self._handles, self._patched = [], []

    # ---- running -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, tokens: list[int]) -> None:
        before = {n: len(self.parts.get(n, [])) for n in self.names}
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.backend.device)
        logits = self.backend.forward(ids)
        self.parts.setdefault("logits", []).append(_stored(logits[0]))
        for n in self.names:
            got = len(self.parts.get(n, [])) - before[n]
            if got != 1:
                raise UserError(f"backend {self.backend.name!r} cannot be traced: boundary {n} was recorded "
                                f"{got} times in one forward (expected once); its trace row does not fit this "
                                f"stack version")

    def result(self) -> dict[str, torch.Tensor]:
        """Every boundary, sequences concatenated on the token axis, TP blocks gathered in rank order."""
        out = {}
        for n in self.names:
            x = torch.cat(self.parts[n], dim=0)
            layer = n.split(".")[2] if n.startswith("layers.") else n
            tap = self.trace.taps.get(layer)
            out[n] = _gather(x, self.backend.device) if tap is not None and tap.tp_split else x
        return out


def _gather(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")  # nccl gathers device tensors only
    local = x.to(on).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts, dim=1).cpu()


def check_lengths(inputs: list[list[int]], max_length: int) -> None:
    for seq in inputs:
        if not seq:
            raise UserError("an empty input sequence cannot be traced")
        if len(seq) > max_length:
            raise UserError(f"the request is {len(seq)} tokens long, longer than the model's context "
                            f"of {max_length} tokens; pick a shorter text or document")


def capture(backend, inputs: list[list[int]]) -> dict[str, torch.Tensor]:
    """Boundary name -> canonical tensor for these model inputs (each at most backend.max_length long)."""
    check_lengths(inputs, backend.max_length)
    with Tracer(backend) as tracer:
        for seq in inputs:
            tracer.run(seq)
    return tracer.result()
