"""The dtypes parity computes and stores in: one table, names as the command line and files spell them.

Kept free of a torch import so that `parity --help` stays fast; `torch_dtype` imports torch when asked.
"""

from __future__ import annotations

from parity.errors import UserError

# parity's name -> torch attribute name (also the name transformers' config.json uses). fp64 is the
# high-precision run `parity explain` measures a dtype's noise against (every stack runs in it).
DTYPES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}


def check_dtype(name: str, where: str = "dtype") -> str:
    if name not in DTYPES:
        raise UserError(f"{where}: unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return name


def torch_dtype(name: str | None):
    """torch.dtype for a parity name (None passes through: "as stored")."""
    if name is None:
        return None
    import torch

    return getattr(torch, DTYPES[check_dtype(name)])


def dtype_name(dtype) -> str:
    """parity's name of a torch.dtype (for manifests and messages)."""
    attr = str(dtype).removeprefix("torch.")
    for name, a in DTYPES.items():
        if a == attr:
            return name
    raise UserError(f"dtype {dtype} is not one parity stores or computes in ({', '.join(DTYPES)})")
