"""The GPU smoke check behind ci/gpu-smoke.sh: one PASS / FAIL / SKIP line per check, exit 1 on any FAIL.

Each check runs `python -m parity run` as a user would (synthetic checkpoints, bundled samples, a few
documents per test) into its own results directory, then reads the manifest: every unit done, on cuda,
on the GPUs and ranks the check is about (UnitRecord.ran_on); the checks with a parity gate then run
`python -m parity check`. Written for one GPU in under 5 minutes; the checks that need two GPUs are
skipped with one.

    bash ci/gpu-smoke.sh                 # every check
    bash ci/gpu-smoke.sh --list          # the checks, one per line
    bash ci/gpu-smoke.sh --only cuda,minis-tp1 --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = "xcopa_en,boolq,hellaswag,mmlu_anatomy"  # four data kinds, one shared-context family (hellaswag)
# bf16 stacks differ by rounding, not by wiring: a wiring bug (rotate-half, gate/up swap, a norm left in
# fp32 ...) moves log-likelihoods by nats; rounding on these synthetic 1b weights by well under 1 nat
BF16_THRESHOLDS = "max_mean_error: null\nmax_abs_delta: 1.0\n"
ENV_PROBE = """
import json, torch, torch.distributed as dist
ok = torch.cuda.is_available()
n = torch.cuda.device_count() if ok else 0
print(json.dumps({"cuda": ok, "gpus": n, "nccl": dist.is_nccl_available(), "cuda_version": torch.version.cuda,
                  "bf16": bool(ok and torch.cuda.is_bf16_supported()),
                  "names": sorted({torch.cuda.get_device_name(i) for i in range(n)})}))
"""


@dataclass
class Check:
    name: str
    what: str
    min_gpus: int = 1
    run: list[str] = field(default_factory=list)  # `parity run` arguments
    env: dict = field(default_factory=dict)
    expect: dict = field(default_factory=dict)  # ran_on fields every unit must show ("gpus": total count)
    thresholds: str | None = None  # `parity check` thresholds yaml (None: parity's defaults)


CHECKS = [
    Check("cuda", "CUDA, nccl and bf16 present"),
    Check("minis-tp1", "7b-mini at TP 1 on CUDA, fp32, meta / hf / megatron, parity check",
          run=["--sizes", "7b-mini", "--dtype", "fp32", "--tests", TESTS, "--limit", "3"],
          expect={"device": "cuda", "ranks": 1, "gpus": 1}),
    Check("gloo-tp2", "13b-mini at TP 2 on one GPU over gloo (meta, megatron), parity check",
          run=["--sizes", "13b-mini", "--backends", "meta,megatron", "--dtype", "fp32", "--tests", TESTS,
               "--limit", "2"],
          env={"PARITY_DIST_BACKEND": "gloo", "CUDA_VISIBLE_DEVICES": "FIRST1"},
          expect={"device": "cuda", "ranks": 2, "gpus": 1}),
    Check("gloo-tp8", "70b-mini at TP 8 on one GPU over gloo (meta, megatron), parity check",
          run=["--sizes", "70b-mini", "--backends", "meta,megatron", "--dtype", "fp32", "--tests", "xcopa_en,boolq",
               "--limit", "2"],
          env={"PARITY_DIST_BACKEND": "gloo", "CUDA_VISIBLE_DEVICES": "FIRST1"},
          expect={"device": "cuda", "ranks": 8, "gpus": 1}),
    Check("1b-bf16", "1b-synthetic in bf16, meta / hf / megatron, parity check (|delta loglik| <= 1 nat)",
          run=["--sizes", "1b-synthetic", "--dtype", "bf16", "--tests", TESTS, "--limit", "3"],
          expect={"device": "cuda", "dtype": "bf16", "gpus": 1}, thresholds=BF16_THRESHOLDS),
    Check("nccl-tp2", "13b-mini at TP 2 over nccl on two GPUs (meta, megatron), parity check", min_gpus=2,
          run=["--sizes", "13b-mini", "--backends", "meta,megatron", "--dtype", "fp32", "--tests", TESTS,
               "--limit", "2"],
          env={"CUDA_VISIBLE_DEVICES": "FIRST2"}, expect={"device": "cuda", "ranks": 2, "gpus": 2}),
    Check("hf-multi-gpu", "1b-synthetic hf spread over two GPUs (accelerate device map, logits_to_keep), bf16, "
          "parity check against meta", min_gpus=2,
          run=["--sizes", "1b-synthetic", "--backends", "meta,hf", "--dtype", "bf16", "--tests", TESTS,
               "--limit", "3"],
          env={"CUDA_VISIBLE_DEVICES": "FIRST2", "PARITY_SPREAD_GPUS": "2"},
          expect={"device": "cuda", "dtype": "bf16"}, thresholds=BF16_THRESHOLDS),
]
# what the hf-multi-gpu check must see on its hf units, beyond `expect`
SPREAD = {"hf-multi-gpu": ("hf", 2)}


def parity(*args, env: dict | None = None, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parity", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (proc.stderr or proc.stdout or "").replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else f"exit {proc.returncode}"


def visible(spec: str, env_gpus: list[str]) -> str:
    """FIRSTn -> the first n GPUs this script sees."""
    return ",".join(env_gpus[: int(spec.removeprefix("FIRST"))]) if spec.startswith("FIRST") else spec


def env_check(timeout: float) -> tuple[bool, str, dict]:
    proc = subprocess.run([sys.executable, "-c", ENV_PROBE], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return False, f"torch does not import: {last_line(proc)}", {}
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    missing = [k for k in ("cuda", "nccl", "bf16") if not info[k]]
    text = (f"CUDA {info['cuda_version']}, {info['gpus']} GPU(s) ({', '.join(info['names']) or 'none'}), "
            f"nccl {'yes' if info['nccl'] else 'NO'}, bf16 {'yes' if info['bf16'] else 'NO'}")
    return not missing, text if not missing else f"{', '.join(missing)} missing: {text}", info


def run_check(check: Check, out: Path, gpus: list[str], timeout: float, device: str = "cuda") -> tuple[bool, str]:
    env = dict(os.environ)
    env.update({k: visible(v, gpus) if k == "CUDA_VISIBLE_DEVICES" else v for k, v in check.env.items()})
    run_dir = out / check.name
    proc = parity("run", "--device", device, "--out", str(run_dir), "--no-report", *check.run, env=env, timeout=timeout)
    if proc.returncode != 0:
        return False, f"parity run exited {proc.returncode}: {last_line(proc)}"
    units = json.loads((run_dir / "manifest.json").read_text())["units"]
    for key, unit in units.items():
        ran = unit.get("ran_on") or {}
        if unit["status"] != "done":
            return False, f"{key} is {unit['status']}: {unit.get('error')}"
        for field_, want in check.expect.items():
            got = sum((ran.get("gpus") or {}).values()) if field_ == "gpus" else ran.get(field_)
            if got != want:
                return False, f"{key} ran with {field_} {got}, expected {want} ({ran})"
        backend, n = SPREAD.get(check.name, (None, 0))
        if key.split("/")[1] == backend and len(ran.get("device_map") or {}) != n:
            return False, f"{key} was not spread over {n} GPUs (device map {ran.get('device_map')})"
    args = ["check", str(run_dir)]
    if check.thresholds is not None:
        (run_dir / "thresholds.yaml").write_text(check.thresholds)
        args += ["--thresholds", str(run_dir / "thresholds.yaml")]
    gate = parity(*args, env=env, timeout=timeout)
    if gate.returncode != 0:
        return False, f"parity check exited {gate.returncode}: {last_line(gate)}"
    some = next(iter(units.values()))["ran_on"]
    gpus_txt = ", ".join(f"{n} x {name}" for name, n in (some.get("gpus") or {}).items())
    on = f"{some['device']} ({gpus_txt})" if gpus_txt else some["device"]
    return True, f"{len(units)} units done on {on}, {some['dtype']}, ranks {some['ranks']}, parity check PASS"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu-smoke", description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the checks and exit")
    ap.add_argument("--only", help="comma-separated check names (default: all)")
    ap.add_argument("--out", help="results directory for the runs (default: a new temp directory)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per parity command")
    args = ap.parse_args(argv)
    if args.list:
        for c in CHECKS:
            print(f"{c.name:13} {c.what}" + (f" [needs {c.min_gpus} GPUs]" if c.min_gpus > 1 else ""))
        return 0
    names = [n.strip() for n in args.only.split(",")] if args.only else [c.name for c in CHECKS]
    unknown = sorted(set(names) - {c.name for c in CHECKS})
    if unknown:
        print(f"gpu-smoke: unknown check {unknown[0]!r}; see --list", file=sys.stderr)
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="parity-gpu-smoke-"))
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    ok, text, info = env_check(args.timeout)
    failed = 0
    if "cuda" in names:
        print(f"{'PASS' if ok else 'FAIL'} cuda: {text} ({time.perf_counter() - t0:.1f}s)", flush=True)
        failed += not ok
    listed = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    gpus = listed[: info.get("gpus", 0)] if listed else [str(i) for i in range(info.get("gpus", 0))]
    for check in CHECKS:
        if check.name == "cuda" or check.name not in names:
            continue
        if not ok:
            print(f"FAIL {check.name}: not run, CUDA is not usable here (see the cuda check)", flush=True)
            failed += 1
            continue
        if len(gpus) < check.min_gpus:
            print(f"SKIP {check.name}: needs {check.min_gpus} GPUs, {len(gpus)} visible", flush=True)
            continue
        t = time.perf_counter()
        try:
            passed, detail = run_check(check, out, gpus, args.timeout)
        except subprocess.TimeoutExpired as e:
            passed, detail = False, f"timed out after {e.timeout:.0f}s"
        print(f"{'PASS' if passed else 'FAIL'} {check.name}: {detail} ({time.perf_counter() - t:.1f}s)", flush=True)
        failed += not passed
    print(f"gpu-smoke: {'FAIL' if failed else 'PASS'} ({failed} failed, {time.perf_counter() - t0:.0f}s, "
          f"runs in {out})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
