"""The worker: run one backend on a Job file (parity.jobs), and the launcher that starts it (torchrun for TP > 1).

The model is loaded once per job; each unit's scores are written atomically by rank 0 (other ranks
compute, as tensor parallelism needs every rank in every forward). A unit whose output exists is
skipped, so an interrupted job resumes. Non-finite log-likelihoods fail that unit only: its
error file (parity.results.error_path) says which backend and request, and the next unit runs.
Beside each unit's scores rank 0 records what it ran on (parity.results.ran_path).
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from parity.errors import UserError
from parity.io import write_json
from parity.jobs import Job
from parity.results import describe_ran_on, error_path, ran_path

# torchrun's own default rendezvous port, for a multi-node endpoint the user did not name; a job's
# rendezvous uses this port + its slot, so jobs side by side never share one
DEFAULT_RDZV_PORT = 29500


def load_backend(name: str, checkpoint, **options):
    """Backend `name` of the registry on `checkpoint` (options: base.Backend's constructor keywords)."""
    from parity.backends import backend_info

    return _construct(backend_info(name).adapter, checkpoint, options)


def _construct(adapter: str, checkpoint, options: dict):
    from parity.backends import adapter_class

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise UserError(f"{checkpoint}: checkpoint directory not found")
    return adapter_class(adapter)(checkpoint, **options)


def run_job(job_path) -> list[str]:
    """Score every unit of a job in this process (one rank). Returns the failed units' error lines."""
    from tqdm import tqdm

    from parity.gpus import check_device_here
    from parity.requests import read_requests, write_scores

    job = Job.read(job_path)
    if job.mode == "trace":  # `parity explain`: boundary tensors instead of scores
        from parity.trace.worker import run_trace_job

        return run_trace_job(job)
    pending = [u for u in job.units if not Path(u.output).is_file()]
    if not pending:
        return []
    check_device_here(job.device, f"{job.size}/{job.backend}".lstrip("/"), job.dtype)
    backend = _construct(job.adapter, job.checkpoint, dict(tp=job.tp, device=job.device, dtype=job.dtype,
                                                           tokenizer_vocab=job.vocab_size, options=job.options))
    from parity.floor import applied, batch_size

    writer = backend.rank == 0
    failed: list[str] = []
    units = [(u, read_requests(u.requests)) for u in pending]
    ran_on = backend.ran_on()  # a collective: every rank
    if writer:
        print(f"{job.size}/{job.backend}: running on {describe_ran_on(ran_on)}".lstrip("/"), file=sys.stderr,
              flush=True)
    # per-token state (Meta's kv cache) is allocated once, for the largest batch of the whole job
    backend.reserve(max(backend.largest_batch(r, batch_size(u.perturbation, job.batch)) for u, r in units))
    # One bar for the whole job (all its tests): the model is loaded once and scores them in a row.
    with tqdm(total=sum(len(r) for _, r in units), desc=f"{job.size}/{job.backend}".lstrip("/"),
              unit="req", file=sys.stderr, disable=not writer, mininterval=1.0, dynamic_ncols=True) as bar:
        for unit, requests in units:
            bar.set_postfix_str(unit.name, refresh=False)
            backoffs, t0 = backend.oom_backoffs, time.perf_counter()
            with applied(unit.perturbation, backend):  # a noise-floor unit: the same math scheduled otherwise
                scores = backend.loglikelihood(requests, batch_size(unit.perturbation, job.batch), progress=bar.update)
            bad = next((i for i, s in enumerate(scores) if not math.isfinite(s.loglik)), None)
            if not writer:
                continue
            error_path(unit.output).unlink(missing_ok=True)
            if bad is not None:
                r = requests[bad]
                line = (f"{job.backend}: non-finite log-likelihood ({scores[bad].loglik}) for request {r.hash} "
                        f"(unit {unit.name}, request #{bad}); try --dtype fp32 or check the checkpoint")
                write_json(error_path(unit.output), {"error": line, "request": r.hash})
                failed.append(line)
                continue
            # the unit's own scoring time (the model load is the job's) travels with it: a resumed or reused
            # unit keeps the cost it had when it was scored (parity.run.finish_unit)
            write_json(ran_path(unit.output), ran_on | {"oom_backoffs": backend.oom_backoffs - backoffs,
                                                        "seconds": round(time.perf_counter() - t0, 3)})
            write_scores(unit.output, requests, scores)
    return failed


def cli_score(args) -> int:
    """Exit 0 when every unit has scores; a unit with NaN/Inf fails alone (its .error.json), the others
    are still scored, and the exit is 2 with the first such error as the one line."""
    from parity.backends.dist import shutdown

    try:
        failed = run_job(args.job)
    except BaseException:
        shutdown(clean=False)
        raise
    shutdown(clean=True)
    if failed:
        more = f" (and {len(failed) - 1} more unit(s))" if len(failed) > 1 else ""
        raise UserError(failed[0] + more)
    return 0


# ---------------------------------------------------------------------------------------------- launching
def launch_command(job_path, nproc: int, *, launcher: str = "local", device: str = "cpu", gpus: int | None = None,
                   slot: int = 0) -> list[str]:
    """The command that runs a job on `nproc` ranks (`gpus`: GPUs per node it gets on cuda, default one per
    rank; `slot`: the job's number in the run, which keeps side-by-side rendezvous ports apart).

    local:    1 rank -> `python -m parity score JOB`; more -> torchrun --standalone on this machine (its
              rendezvous takes a free port).
    torchrun: multi-node; nodes / endpoint from PARITY_NNODES, PARITY_RDZV_ENDPOINT (host:port, the port
              + slot is used), PARITY_NPROC_PER_NODE (default nproc / nnodes), run once on every node.
    slurm:    one srun task per node running the job's ranks on it (torchrun --standalone on one node; on
              several, a c10d rendezvous on the first host of the step, port DEFAULT_RDZV_PORT + slot);
              --gpus-per-node from `gpus`, --cpus-per-task from PARITY_CPUS_PER_TASK or SLURM_CPUS_PER_TASK.
    """
    job = str(job_path)
    module = ["-m", "parity", "score", job]
    rdzv_id = f"parity-{Path(job).stem}"
    if nproc < 1:
        raise UserError(f"{job}: cannot launch {nproc} processes")
    if launcher == "local":
        if nproc == 1:
            return [sys.executable, *module]
        return [*_torchrun(), "--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), *module]
    if launcher == "torchrun":
        nnodes = int(os.environ.get("PARITY_NNODES", "1"))
        per_node = int(os.environ.get("PARITY_NPROC_PER_NODE", str(max(1, nproc // nnodes))))
        endpoint = _offset(os.environ.get("PARITY_RDZV_ENDPOINT", f"localhost:{DEFAULT_RDZV_PORT}"), slot)
        return [*_torchrun(), "--nnodes", str(nnodes), "--nproc-per-node", str(per_node),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id, *module]
    if launcher == "slurm":
        per_node = int(os.environ.get("PARITY_NPROC_PER_NODE", str(nproc)))
        nnodes = max(1, math.ceil(nproc / per_node))
        ranks_here = min(nproc, per_node)
        if nproc == 1:
            inner = shlex.join([sys.executable, *module])
        elif nnodes == 1:
            inner = shlex.join([*_torchrun(check=False), "--standalone", "--nnodes", "1", "--nproc-per-node",
                                str(ranks_here), *module])
        else:  # the shell of each task expands the first host of the step
            first = '$(scontrol show hostnames "${SLURM_STEP_NODELIST:-$SLURM_JOB_NODELIST}" | head -n1)'
            endpoint = _offset(os.environ.get("PARITY_RDZV_ENDPOINT", f"{first}:{DEFAULT_RDZV_PORT}"), slot)
            inner = " ".join([shlex.join([*_torchrun(check=False), "--nnodes", str(nnodes), "--nproc-per-node",
                                          str(ranks_here), "--rdzv-backend", "c10d"]),
                              "--rdzv-endpoint", f'"{endpoint}"', shlex.join(["--rdzv-id", rdzv_id, *module])])
        cpus = os.environ.get("PARITY_CPUS_PER_TASK") or os.environ.get("SLURM_CPUS_PER_TASK")
        # with a CPU count, --exact gives the step only what it asks for, so steps can run side by side
        return ["srun", f"--nodes={nnodes}", "--ntasks-per-node=1",
                *([f"--gpus-per-node={gpus or ranks_here}"] if device == "cuda" else []),
                *([f"--cpus-per-task={cpus}", "--exact"] if cpus else []),
                "bash", "-c", inner]
    raise UserError(f"unknown launcher {launcher!r}; use local, torchrun or slurm")


def _offset(endpoint: str, slot: int) -> str:
    """host:port -> host:(port + slot)."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"PARITY_RDZV_ENDPOINT={endpoint!r}: expected host:port")
    return f"{host}:{int(port) + slot}"


def _torchrun(check: bool = True) -> list[str]:
    """torchrun beside this interpreter (the venv's), else on PATH."""
    here = Path(sys.executable).with_name("torchrun")
    found = str(here) if here.is_file() else shutil.which("torchrun")
    if not found:
        if check:
            raise UserError("torchrun not found beside python or on PATH; install torch in this environment "
                            "(TP/MP > 1 needs torchrun)")
        return ["torchrun"]
    return [found]


def launch(job_path, nproc: int, *, launcher: str = "local", device: str = "cpu", gpus: int | None = None,
           visible: list[str] | None = None, slot: int = 0, timeout: float | None = None,
           log: Path | None = None, show: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run a job in a fresh process group (so no global state leaks between backends); `visible`: the GPUs
    it may use (its CUDA_VISIBLE_DEVICES), from parity.gpus.GpuPool.

    stderr is passed through live (the progress bar) and also kept: the returned CompletedProcess
    carries its last lines in .stderr for error messages. With `log`, everything the stacks print (stdout
    and stderr: deprecation warnings, fairscale's "> initializing model parallel", ...) goes to that file
    and the terminal gets only the lines (and progress-bar redraws) that start with one of `show`."""
    cmd = launch_command(job_path, nproc, launcher=launcher, device=device, gpus=gpus, slot=slot)
    env = dict(os.environ)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, nproc))))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # a nested launch must not inherit a rank
    tail = bytearray()
    log_file = None
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log, "ab")  # noqa: SIM115 (closed below, after the child and the pump are done)
    # the stacks print to stdout (fairscale, megatron): keep stdout for the report, send theirs to stderr
    try:
        child_stdout = log_file.fileno() if log_file else sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a descriptor
        child_stdout = subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=child_stdout, stderr=subprocess.PIPE, env=env)
    shown = _Filter(show) if log_file else None

    def pump():  # bytes, not lines: tqdm redraws with \r
        while chunk := os.read(proc.stderr.fileno(), 65536):
            if log_file:
                log_file.write(chunk)
                log_file.flush()
            out = shown.feed(chunk) if shown else chunk
            if out:
                sys.stderr.buffer.write(out) if hasattr(sys.stderr, "buffer") else sys.stderr.write(
                    out.decode(errors="replace"))
                sys.stderr.flush()
            tail.extend(chunk)
            del tail[:-20000]

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        rc = proc.wait(timeout=timeout)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        proc.kill()
        proc.wait()
        raise
    thread.join()
    if log_file:
        log_file.close()
    text = tail.decode(errors="replace").replace("\r", "\n")
    return subprocess.CompletedProcess(cmd, rc, "", text)


class _Filter:
    """Keeps the pieces of a byte stream (split after \n or \r, so tqdm's redraws stay whole) that start with
    one of the prefixes; an unfinished piece waits for the next chunk. A warning printed right after a bar
    redraw lands on the bar's piece: what follows the bar's closing "[...]" is cut off."""

    BAR = re.compile(rb"[^|\r\n]*\|[^|]*\|[^\[\r\n]*\[[^\]]*\]")  # "desc:  10%|##  | 1/9 [00:01<00:09, 1.0req/s, x]"

    def __init__(self, prefixes: tuple[str, ...]):
        self.prefixes = tuple(p.encode() for p in prefixes)
        self.pending = b""

    def feed(self, chunk: bytes) -> bytes:
        pieces = re.split(rb"(?<=[\r\n])", self.pending + chunk)
        self.pending = pieces.pop() if pieces and not pieces[-1].endswith((b"\r", b"\n")) else b""
        return b"".join(self._bar_only(p) for p in pieces if p.lstrip(b"\r\n").startswith(self.prefixes))

    def _bar_only(self, piece: bytes) -> bytes:
        m = self.BAR.match(piece.lstrip(b"\r\n"))
        if m is None:
            return piece
        start = len(piece) - len(piece.lstrip(b"\r\n"))
        rest = piece[start + m.end():]
        return piece if not rest.strip() else piece[:start + m.end()] + b"\n"
