"""parity run's own logic: flags, config, lock (no model needed)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from parity.config import load_config, parse_checkpoint_flags
from parity.errors import UserError
from parity.run import RunLock


def test_checkpoint_flag_parsing(tmp_path):
    got = parse_checkpoint_flags([f"7b:megatron={tmp_path}"])
    assert got == {("7b", "megatron"): tmp_path}
    with pytest.raises(UserError, match="SIZE:BACKEND=DIR"):
        parse_checkpoint_flags(["7b-megatron"])
    with pytest.raises(UserError, match="unknown size"):
        parse_checkpoint_flags([f"8b:meta={tmp_path}"])
    with pytest.raises(UserError, match="unknown backend"):
        parse_checkpoint_flags([f"7b:vllm={tmp_path}"])


def test_config_errors(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("checkpoints: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("checkpoints:\n  9b:\n    meta: /x\n")
    with pytest.raises(UserError, match="unknown size '9b'"):
        load_config(str(unknown))


def test_real_size_without_checkpoint_names_the_config_key(tmp_path):
    r = subprocess.run([sys.executable, "-m", "parity", "run", "--sizes", "7b", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "checkpoints.7b.meta" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_unknown_size_and_backend_one_line(tmp_path):
    for flags, needle in [(["--sizes", "7b-tiny"], "unknown size"), (["--backends", "vllm"], "unknown backend")]:
        r = subprocess.run([sys.executable, "-m", "parity", "run", *flags, "--out", str(tmp_path / "r")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert needle in r.stderr and "Traceback" not in r.stderr


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from parity.run import RunLock
        with RunLock(Path({str(tmp_path)!r})):
            print("locked", flush=True)
            time.sleep(30)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"in use by parity run pid {holder.pid}"):
            with RunLock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    # The kernel drops the lock of a dead holder: the directory is usable again at once.
    with RunLock(tmp_path):
        pass


def test_different_directories_lock_independently(tmp_path):
    with RunLock(tmp_path / "a"), RunLock(tmp_path / "b"):
        time.sleep(0)


def test_results_of_an_incompatible_version_are_refused(tmp_path):
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text('{"format": 0, "units": {}}')
    r = subprocess.run([sys.executable, "-m", "parity", "run", "--sizes", "7b-mini", "--tests", "boolq",
                        "--out", str(run_dir)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "incompatible version of parity" in r.stderr and "Traceback" not in r.stderr
    assert (run_dir / "manifest.json").read_text() == '{"format": 0, "units": {}}'  # left as it was


def test_unit_hash_is_unchanged_by_default_options_and_changed_by_the_te_spec(tmp_path):
    """Stored results stay valid: only a non-default backend option (megatron's te spec) enters the hash."""
    import hashlib
    import json as _json
    from types import SimpleNamespace

    from parity import RESULTS_FORMAT
    from parity.run import unit_inputs

    plan = SimpleNamespace(dtype="fp32", device="cpu", backend_options={})
    ckpt, td = {"fingerprint": "f", "tp": 1}, SimpleNamespace(digest="d")
    before = hashlib.sha256(_json.dumps([RESULTS_FORMAT, "megatron", "f", 1, "fp32", "cpu", "d"],
                                        separators=(",", ":")).encode()).hexdigest()[:16]  # the formula so far
    assert unit_inputs("megatron", ckpt, plan, td) == before
    plan.backend_options = {"megatron": {"spec": "te"}}
    assert unit_inputs("megatron", ckpt, plan, td) != before
    assert unit_inputs("meta", ckpt, plan, td) == unit_inputs("meta", ckpt, SimpleNamespace(
        dtype="fp32", device="cpu", backend_options={}), td)


def test_chat_sizes_are_their_base_sizes(tmp_path, capsys):
    """7b-chat / 13b-chat / 70b-chat (the seed's 7Bf / 13Bf / 70Bf): the base size's shapes, Meta files and
    TP under a name of their own, accepted wherever a size is (configs, --sizes, --checkpoint)."""
    import dataclasses

    from parity.arch import get_size
    from parity.cli import main

    for base in ("7b", "13b", "70b"):
        chat = get_size(f"{base}-chat")
        assert chat.name == f"{base}-chat" and dataclasses.replace(chat, name=base) == get_size(base)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("checkpoints:\n  70b-chat:\n    meta: /data/llama-2-70b-chat\n")
    assert load_config(str(cfg))["checkpoints"]["70b-chat"]["meta"] == "/data/llama-2-70b-chat"
    assert parse_checkpoint_flags([f"13b-chat:megatron={tmp_path}"]) == {("13b-chat", "megatron"): tmp_path}
    assert main(["run", "--sizes", "13b-chat", "--out", str(tmp_path / "r")]) == 2
    assert "checkpoints.13b-chat.meta" in capsys.readouterr().err
