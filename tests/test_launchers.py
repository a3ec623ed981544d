"""Launch command lines (local, torchrun, slurm) and one real multi-"node" slurm launch through a fake srun.

The fake srun runs its command once per node on this machine, with the step's node list set, and a fake
scontrol names localhost: so the rendezvous of `--launcher slurm` over 2 nodes (13b-mini meta, TP 2 as
2 nodes x 1 rank) is exercised exactly as the shell inside an allocation would run it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from parity.backends import worker
from cli_helpers import run_parity


def test_local_standalone_and_single_process(tmp_path):
    job = tmp_path / "j.json"
    assert worker.launch_command(job, 1, device="cuda") == [sys.executable, "-m", "parity", "score", str(job)]
    cmd = worker.launch_command(job, 2, device="cuda", slot=3)
    assert "--standalone" in cmd and "--rdzv-endpoint" not in cmd  # torchrun picks a free port itself


def test_multinode_rendezvous_ports_differ_per_job(tmp_path, monkeypatch):
    job = tmp_path / "j.json"
    monkeypatch.setenv("PARITY_NNODES", "2")
    monkeypatch.setenv("PARITY_RDZV_ENDPOINT", "node0:29400")
    def endpoint(cmd):
        return cmd[cmd.index("--rdzv-endpoint") + 1]

    ports = {endpoint(worker.launch_command(job, 16, launcher="torchrun", slot=s)) for s in range(3)}
    assert ports == {"node0:29400", "node0:29401", "node0:29402"}


def test_slurm_single_node(tmp_path, monkeypatch):
    job = tmp_path / "j.json"
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    cmd = worker.launch_command(job, 8, launcher="slurm", device="cuda")
    assert cmd[:5] == ["srun", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=8", "bash"]
    assert "--standalone" in cmd[-1] and "SLURM_LAUNCH_NODE_IPADDR" not in cmd[-1]
    # hf: one process spread over the size's GPUs
    cmd = worker.launch_command(job, 1, launcher="slurm", device="cuda", gpus=8)
    assert "--gpus-per-node=8" in cmd and "torchrun" not in cmd[-1] and "-m parity score" in cmd[-1]
    # the allocation's CPU count goes to the step (srun no longer inherits it), which then takes only that
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "64")
    cmd = worker.launch_command(job, 8, launcher="slurm", device="cuda")
    assert "--cpus-per-task=64" in cmd and "--exact" in cmd
    monkeypatch.setenv("PARITY_CPUS_PER_TASK", "32")
    assert "--cpus-per-task=32" in worker.launch_command(job, 8, launcher="slurm", device="cpu")


def test_slurm_multinode_rendezvous_on_the_first_host_of_the_step(tmp_path, monkeypatch):
    monkeypatch.setenv("PARITY_NPROC_PER_NODE", "8")
    cmd = worker.launch_command(tmp_path / "j.json", 16, launcher="slurm", device="cuda", slot=2)
    assert cmd[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8"]
    assert 'scontrol show hostnames "${SLURM_STEP_NODELIST:-$SLURM_JOB_NODELIST}" | head -n1):29502' in cmd[-1]
    assert "--nnodes 2 --nproc-per-node 8" in cmd[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_slurm_two_nodes_really_rendezvous(tmp_path):
    """~30 s: two torchrun agents + two meta ranks; the one test that runs the multi-node command line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("""#!/usr/bin/env bash
nodes=1
while [[ "$1" == --* ]]; do case "$1" in --nodes=*) nodes="${1#--nodes=}";; esac; echo "$1" >> "$SRUN_LOG"; shift; done
pids=()
for ((i = 0; i < nodes; i++)); do SLURM_STEP_NODELIST=fake[1-2] "$@" & pids+=($!); done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
""")
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\n[[ "$*" == "show hostnames fake[1-2]" ]] && '
                                      'printf "localhost\\nlocalhost\\n"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_LOG": str(tmp_path / "srun.log"),
           "PARITY_NPROC_PER_NODE": "1",
           # the endpoint's host is still expanded by the task's shell; only the port is made free
           "PARITY_RDZV_ENDPOINT": '$(scontrol show hostnames "$SLURM_STEP_NODELIST" | head -n1):'
                                   f"{_free_port()}"}
    out = tmp_path / "r"
    r = run_parity("run", "--launcher", "slurm", "--device", "cpu", "--sizes", "13b-mini", "--backends", "meta",
                   "--tests", "xcopa_en", "--limit", "2", "--out", str(out), "--no-report", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--nodes=2" in Path(env["SRUN_LOG"]).read_text()
    unit = json.loads((out / "manifest.json").read_text())["units"]["13b-mini/meta/xcopa_en"]
    assert unit["status"] == "done" and unit["ran_on"]["ranks"] == 2
