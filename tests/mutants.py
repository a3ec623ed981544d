"""Converter mutants (no tests here; tests/test_mutants.py runs them): consistent mistakes, made the same
way in a format's writer and its reader, so every round trip stays bit-exact while the converted model
is no longer Meta's. Each is a source edit of a copy of the parity package; the suite must fail on it
whether the conversion cache is warm (it holds the unmutated converter's output) or cold.

Run as a script: `python tests/mutants.py SPEC.json`. The parent imports the heavy stacks once and
never parity; each mutant runs in a forked child that imports parity from its mutated copy, applies
the suite's own checks (tests/conversion_checks.py) against the Meta reference's logits computed by the
unmutated package (SPEC's reference file), and writes what they found to SPEC's out dir.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import NamedTuple


class Mutant(NamedTuple):
    name: str
    fmt: str  # the format whose converted model it changes (the fresh-conversion check of that format)
    edits: tuple[tuple[str, str, str], ...]  # (file under parity/, text, replacement), each text once


MUTANTS = [
    Mutant("control: the converter as it is", "hf", ()),
    Mutant("hf: rotary permutation of wq / wk with twice the head dim, both ways", "hf", (
        ("checkpoints/hf.py", "        return spec.size.n_heads\n", "        return spec.size.n_heads // 2\n"),
        ("checkpoints/hf.py", "        return spec.size.n_kv_heads\n", "        return spec.size.n_kv_heads // 2\n"),
        ("checkpoints/hf.py", "h, hd = heads_of(key, self.spec), self.spec.size.head_dim",
         "h, hd = heads_of(key, self.spec), 2 * self.spec.size.head_dim"),)),
    Mutant("hf: attention and ffn norms swapped, both ways", "hf", (
        ("checkpoints/hf.py",
         '"model.layers.{i}.input_layernorm.weight",\n    "layers.{i}.ffn_norm.weight": '
         '"model.layers.{i}.post_attention_layernorm.weight",',
         '"model.layers.{i}.post_attention_layernorm.weight",\n    "layers.{i}.ffn_norm.weight": '
         '"model.layers.{i}.input_layernorm.weight",'),)),
    Mutant("hf: embeddings and lm_head swapped, both ways", "hf", (
        ("checkpoints/hf.py", '"model.embed_tokens.weight"', '"lm_head.weight"'),
        ("checkpoints/hf.py", '"output.weight": "lm_head.weight"', '"output.weight": "model.embed_tokens.weight"'),)),
    Mutant("hf+megatron: no rotate-half permutation, both ways", "hf", (
        ("checkpoints/spec.py", "return w.view(n_heads, hd // 2, 2, dim).transpose(1, 2).reshape(rows, dim)",
         "return w.clone()"),
        ("checkpoints/spec.py", "return w.view(n_heads, 2, hd // 2, dim).transpose(1, 2).reshape(rows, dim)",
         "return w.clone()"),)),
    Mutant("megatron: gate and up halves of linear_fc1 swapped, both ways", "megatron", (
        ("checkpoints/megatron.py", '"fc1", "layers.{i}.feed_forward.w1.weight",\n', '"fc1", "layers.{i}.feed_forward.w3.weight",\n'),
        ("checkpoints/megatron.py", '  "layers.{i}.feed_forward.w3.weight"),', '  "layers.{i}.feed_forward.w1.weight"),'),)),
    Mutant("megatron: k and v of each kv group swapped in linear_qkv, both ways", "megatron", (
        ("checkpoints/megatron.py", "torch.cat([q, k, v], dim=1)", "torch.cat([q, v, k], dim=1)"),
        ("checkpoints/megatron.py", "q, k, v = qkv.split(", "q, v, k = qkv.split("),)),
]


def mutated_copy(package: Path, root: Path, mutant: Mutant) -> Path:
    """A copy of the parity package under root/parity with the mutant's edits; returns root."""
    shutil.copytree(package, root / "parity", ignore=shutil.ignore_patterns("__pycache__"))
    for rel, text, new in mutant.edits:
        f = root / "parity" / rel
        s = f.read_text()
        assert s.count(text) == 1, f"mutant {mutant.name!r} no longer applies to {rel}: {text!r} found {s.count(text)}x"
        f.write_text(s.replace(text, new))
    return root


# ---------------------------------------------------------------------------------------------- runner
PARALLEL = 2  # children at a time: the project's 2-core budget
def _child(job: dict, tests_dir: Path) -> dict:
    """In a forked child: import parity from the mutant's copy, run the suite's checks on every cache."""
    assert "parity" not in sys.modules, "the runner imported parity before choosing the copy"
    sys.path.insert(0, job["tree"])
    sys.path.insert(1, str(tests_dir))
    import parity
    from conversion_checks import fresh_conversion_gap, round_trip_changes

    assert Path(parity.__file__).resolve().is_relative_to(Path(job["tree"]).resolve()), parity.__file__
    import torch

    torch.set_num_threads(1)  # two children share the cores
    # the round trip through the format the mutant touches (Megatron at TP 2: the rank layout too)
    out: dict = {"round_trip_changes": round_trip_changes(Path(job["meta"]["cold"]), Path(job["work"]),
                                                          (job["fmt"],), tp=2)}
    ref = torch.load(job["reference"], weights_only=True)  # Meta's logits, from the unmutated package
    for cache in ("warm", "cold"):
        os.environ["PARITY_CACHE"] = job["caches"][cache]
        gap, ckpt = fresh_conversion_gap(Path(job["meta"][cache]), job["fmt"], ref=ref)
        out[cache] = {"gap": gap, "checkpoint": str(ckpt)}
    return out


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    tests_dir = Path(__file__).resolve().parent
    # the heavy imports once, before forking (never parity's: a child imports its own copy)
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401
    import llama_models.llama3.model  # noqa: F401
    import fairscale.nn.model_parallel.initialize  # noqa: F401
    from megatron.core.models.gpt import GPTModel  # noqa: F401

    running: set[int] = set()
    for i, job in enumerate(spec["jobs"]):
        if len(running) >= PARALLEL:
            running.discard(os.wait()[0])
        pid = os.fork()
        if pid == 0:
            try:
                data = _child(job, tests_dir)
            except BaseException:
                data = {"error": traceback.format_exc()[-3000:]}
            (Path(spec["out"]) / f"{i}.json").write_text(json.dumps(data))
            os._exit(0)
        running.add(pid)
    while running:
        running.discard(os.wait()[0])
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
