"""GPU assignment and device choice without a GPU: the pool, each worker's GPUs, the device decided where
the models run (a fake `srun` stands in for a slurm allocation), and workers side by side never sharing
a GPU (`parity run --device cuda` with the worker launch replaced by a recorder)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

import parity.run
from parity.backends import worker
from parity.cli import build_parser
from parity.errors import UserError
from parity.gpus import GpuPool, check_device_here, default_device, worker_gpus


def fake_bin(tmp_path, name: str, script: str):
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_text("#!/usr/bin/env bash\n" + script)
    p.chmod(0o755)
    return d


def test_pool_hands_out_disjoint_gpus_first_come_first_served():
    pool = GpuPool(["0", "1", "2", "3"])
    order, held, clash = [], set(), []
    lock = threading.Lock()

    def job(name, n, delay):
        time.sleep(delay)
        with pool.lease(n) as gpus:
            with lock:
                if held & set(gpus):
                    clash.append(name)
                held.update(gpus)
                order.append(name)
            assert len(gpus) == n
            time.sleep(0.2)
            with lock:
                held.difference_update(gpus)

    threads = [threading.Thread(target=job, args=a) for a in
               [("a", 3, 0.0), ("big", 4, 0.05), ("small", 1, 0.1)]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not clash
    # "small" fits beside "a" but came after "big", which needs all four: it waits its turn
    assert order == ["a", "big", "small"]
    assert sorted(pool.free) == ["0", "1", "2", "3"]


def test_pool_refuses_a_worker_larger_than_the_node():
    with pytest.raises(UserError, match=r"70b/meta needs 8 GPU\(s\) but 4 visible.*PARITY_DIST_BACKEND=gloo"):
        GpuPool(["0", "1", "2", "3"]).check(8, "70b/meta")


def test_worker_gpus():
    assert worker_gpus("ranks", 8, 8, 8, share=False) == 8
    assert worker_gpus("ranks", 8, 8, 4, share=False) == 8  # the pool's check refuses it, never shrinks TP
    assert worker_gpus("ranks", 8, 8, 1, share=True) == 1  # gloo: ranks share the one GPU
    assert worker_gpus("size", 1, 8, 8, share=False) == 8  # hf: one process over the size's TP GPUs
    assert worker_gpus("size", 1, 8, 4, share=False) == 4  # ... or what there is (offload is refused later)
    assert worker_gpus("size", 1, 2, None, share=False) == 2  # slurm: the allocation decides


def test_spread_gpus_override(monkeypatch):
    monkeypatch.setenv("PARITY_SPREAD_GPUS", "2")
    assert worker_gpus("size", 1, 1, 8, share=False) == 2  # a 1-GPU size spread over 2 (ci/gpu-smoke.sh)
    assert worker_gpus("ranks", 1, 1, 8, share=False) == 1  # ranks are ranks
    monkeypatch.setenv("PARITY_SPREAD_GPUS", "two")
    with pytest.raises(UserError, match="PARITY_SPREAD_GPUS='two': must be a positive number"):
        worker_gpus("size", 1, 1, 8, share=False)


def test_device_is_decided_where_the_workers_run(tmp_path, monkeypatch):
    # slurm: `parity run` may sit on a login node without GPUs; the allocation is asked
    monkeypatch.setenv("PATH", f"{fake_bin(tmp_path, 'srun', 'echo 8')}:{os.environ['PATH']}")
    assert default_device("slurm") == "cuda"
    assert default_device("local") == "cpu"  # this machine has none
    monkeypatch.setenv("PATH", f"{fake_bin(tmp_path, 'srun', 'echo srun: error: no allocation >&2; exit 1')}:"
                               f"{os.environ['PATH']}")
    with pytest.raises(UserError, match="could not report the allocation's GPUs .srun: error: no allocation"):
        default_device("slurm")


def test_real_probe_through_a_pass_through_srun(tmp_path, monkeypatch):
    srun = fake_bin(tmp_path, "srun", 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    monkeypatch.setenv("PATH", f"{srun}:{os.environ['PATH']}")
    assert default_device("slurm") == "cpu"  # the probe really ran python + torch "in the allocation"


def test_worker_refuses_cuda_on_a_node_without_gpu():
    check_device_here("cpu", "x")
    with pytest.raises(UserError, match="7b/meta: the run chose --device cuda but .* has no usable GPU"):
        check_device_here("cuda", "7b/meta")


def test_parallel_defaults(monkeypatch):
    monkeypatch.setattr(parity.run, "visible_gpus", lambda: [str(i) for i in range(8)])
    assert parity.run._parallel(None, "cpu", "local") == 1
    assert parity.run._parallel(None, "cuda", "local") == 8
    assert parity.run._parallel(None, "cuda", "slurm") == 1
    assert parity.run._parallel(3, "cuda", "local") == 3
    with pytest.raises(UserError, match="--launcher torchrun"):
        parity.run._parallel(2, "cuda", "torchrun")
    with pytest.raises(UserError, match="at least 1"):
        parity.run._parallel(0, "cpu", "local")


def test_te_spec_on_cpu_is_refused_before_anything_runs(tmp_path):
    args = build_parser().parse_args(["run", "--sizes", "7b-mini", "--backends", "meta", "--device", "cpu",
                                      "--megatron-spec", "te", "--out", str(tmp_path / "r")])
    with pytest.raises(UserError, match="--megatron-spec te: Transformer Engine runs on cuda only"):
        parity.run.make_plan(args)


def test_launch_gives_the_worker_its_gpus(tmp_path, monkeypatch):
    code = "import os, sys; sys.stderr.write(os.environ.get('CUDA_VISIBLE_DEVICES', 'unset'))"
    monkeypatch.setattr(worker, "launch_command", lambda *a, **k: [sys.executable, "-c", code])
    assert worker.launch(tmp_path / "j.json", 2, visible=["3", "5"]).stderr == "3,5"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    assert worker.launch(tmp_path / "j.json", 1).stderr == "7"  # no pool (cpu, slurm): inherited


def test_workers_side_by_side_never_share_a_gpu(tmp_path, monkeypatch):
    """--device cuda on 8 (pretend) GPUs: every worker gets its own GPUs, as many as it has ranks (hf: the
    size's TP), all workers whose GPUs are free run at once, and none ever shares a GPU."""
    monkeypatch.setattr(parity.run, "visible_gpus", lambda: [str(i) for i in range(8)])
    launched, running, clash = [], set(), []
    changed = threading.Condition()

    def fake_launch(job_path, nproc, *, launcher, device, gpus, visible, slot, timeout=None, **logging):
        with changed:
            clash.extend(set(visible) & running)
            running.update(visible)
            launched.append((job_path.stem, nproc, gpus, tuple(visible), slot, len(running)))
            changed.notify_all()
            # a small worker stays until the four small ones run at once (their GPUs fit together), however
            # long the others' checkpoints take to prepare; a pool that serialised them times out here
            if not job_path.stem.startswith("70b"):
                changed.wait_for(lambda: len(running) >= 6, timeout=60)
        time.sleep(0.1)
        with changed:
            running.difference_update(visible)
            changed.notify_all()
        return subprocess.CompletedProcess([], 1, "", "fake worker")

    monkeypatch.setattr(worker, "launch", fake_launch)
    args = build_parser().parse_args(["run", "--sizes", "7b-mini,13b-mini,70b-mini", "--backends", "meta,hf",
                                      "--tests", "xcopa_en", "--device", "cuda", "--out", str(tmp_path / "r")])
    plan = parity.run.make_plan(args)
    assert plan.parallel == 8 and plan.dtype == "bf16"
    parity.run.execute(plan, progress=lambda m: None)
    got = {name: (nproc, gpus, len(visible), slot) for name, nproc, gpus, visible, slot, _ in launched}
    assert got == {"7b-mini-meta": (1, 1, 1, 0), "7b-mini-hf": (1, 1, 1, 1),
                   "13b-mini-meta": (2, 2, 2, 2), "13b-mini-hf": (1, 2, 2, 3),
                   "70b-mini-meta": (8, 8, 8, 4), "70b-mini-hf": (1, 8, 8, 5)}
    assert not clash
    # the four small workers ran at once (1 + 1 + 2 + 2 GPUs); each 70b one had all 8 to itself
    assert max(n for name, *_, n in launched if not name.startswith("70b")) == 6


def test_a_worker_the_node_cannot_hold_is_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(parity.run, "visible_gpus", lambda: ["0", "1", "2", "3"])
    monkeypatch.setattr(worker, "launch", lambda *a, **k: pytest.fail("no worker may start"))
    args = build_parser().parse_args(["run", "--sizes", "7b-mini,70b-mini", "--backends", "meta", "--tests",
                                      "xcopa_en", "--device", "cuda", "--out", str(tmp_path / "r")])
    with pytest.raises(UserError, match="70b-mini/meta needs 8 GPU"):
        parity.run.execute(parity.run.make_plan(args), progress=lambda m: None)


def test_hf_device_map_spreads_over_the_workers_gpus_and_refuses_offload():
    """transformers' own "auto" placement, sized from the given GPUs only (fake free-memory figures)."""
    import torch
    from transformers import LlamaConfig

    from parity.backends.hf import plan_device_map
    from backend_helpers import converted, meta_checkpoint

    config = LlamaConfig.from_pretrained(converted(meta_checkpoint("7b-mini"), "hf"))
    device_map = plan_device_map(config, torch.bfloat16, {0: 6 << 20, 1: 6 << 20}, "ckpt")  # a 4.3 MiB model
    assert set(device_map.values()) == {0, 1}
    assert device_map["model.embed_tokens"] == 0 and device_map["lm_head"] == 1
    with pytest.raises(UserError, match=r"ckpt: does not fit on the 2 GPU\(s\) .* would offload .* to CPU/disk"):
        plan_device_map(config, torch.bfloat16, {0: 1 << 20, 1: 1 << 20}, "ckpt")
