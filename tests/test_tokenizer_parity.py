"""Tokenizer parity: the HF tokenizer parity writes encodes exactly as sentencepiece; the check finds the
forms that do not, in `parity tokenizers`, in a run's report and in `parity check`; bad tokenizers exit 2.

The slow test (all 37,166 documents of ../shared/data) caches the documents' strings in the test cache,
so only its first run pays for reading the data files.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parity.checkpoints.convert import convert
from parity.checkpoints.hf_tokenizer import write_tokenizer_files
from parity.checkpoints.synthetic import cached_checkpoint
from parity.cli import main
from parity.errors import UserError
from parity.tokenizer_check.encoders import encode_pairs, kind_of_file, load, split_pair

# The strings, the prefix-space cases, whitespace runs past the longest whitespace piece (16),
# literal special-token text, byte fallback and the MMLU text that moved a log-likelihood by 2.5 nats.
TRICKY = ["x  y", "A.  Both", " A", "  leading", "trailing  ", "CaCl2   calcium chloride", "Hello\n\nworld  ",
          "a" + " " * 18 + "b", "x" + " " * 33 + "y", "<s> hi </s>", "1</s>", "tab\t\tand\r\n", "中文 😀 ß",
          "\u2581 literal metaspace", "choice:\n  choice: two"]


def sp_ids(tok: Path, texts: list[str]) -> list[list[int]]:
    sp = load("sentencepiece", tok)
    return sp.encode(texts)


@pytest.fixture(scope="module")
def forms(tmp_path_factory, llama2_tokenizer) -> dict[str, Path]:
    """The Llama-2 tokenizer in every form hf_tokenizer.FORMS writes."""
    root = tmp_path_factory.mktemp("forms")
    out = {}
    for form in ("exact", "llama-class", "hub"):
        d = root / form
        d.mkdir()
        write_tokenizer_files(llama2_tokenizer, d, 4096, form)
        out[form] = d
    return out


def test_exact_form_encodes_like_sentencepiece_where_the_others_do_not(forms, llama2_tokenizer):
    ref = sp_ids(llama2_tokenizer, TRICKY)
    exact = load("hf", forms["exact"])
    assert type(exact.tok).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast")
    assert exact.tok(TRICKY)["input_ids"] == ref
    assert ref[0] == [1, 921, 29871, 343]  # sentencepiece: ▁x ▁ ▁y
    # lm-eval's HFLM encodes a text that starts with the BOS string without special tokens
    assert exact.encode(["<s> hi"]) == [ref[TRICKY.index("<s> hi </s>")][1:5]]
    # the counterexamples of docs/tokenizers.md: merges ranked by piece id put ▁▁ before ▁y
    for form in ("llama-class", "hub"):
        other = load("hf", forms[form]).tok(TRICKY)["input_ids"]
        assert other[0] == [1, 921, 259, 29891], form
        assert sum(a != b for a, b in zip(other, ref)) >= 5, form


def test_exact_form_fuzz_and_the_project_tokenizer(forms, llama2_tokenizer, tmp_path):
    """Random strings of Llama-2 pieces, whitespace runs and repeated substrings (score ties, commuting
    merges), for the real tokenizer and for the project's own small one (other scores, other merges)."""
    from parity.tokenizer import default_tokenizer

    rng = random.Random(0)
    sp = load("sentencepiece", llama2_tokenizer).tok
    pieces = [sp.id_to_piece(i).replace("▁", " ") for i in range(259, 32000, 7)]
    extra = [" ", "  ", "   ", "\n", "ha", "haha", "aa", "<s>", "—", "é", "😀", "\t", "\u00a0"]
    texts = ["".join(rng.choice(pieces) if rng.random() < 0.6 else rng.choice(extra)
                     for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    texts += [" " * n + "x" + " " * n for n in range(40)]
    own = tmp_path / "own"
    own.mkdir()
    write_tokenizer_files(default_tokenizer(), own, 4096)
    for tok, d in ((llama2_tokenizer, forms["exact"]), (default_tokenizer(), own)):
        assert load("hf", d).tok(texts)["input_ids"] == sp_ids(tok, texts), tok


def test_convert_writes_the_exact_form_and_it_loads_offline(llama2_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    hf = convert("meta", "hf", cached_checkpoint("7b-mini", tokenizer=llama2_tokenizer), tmp_path / "hf")
    cfg = json.loads((hf / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["split_special_tokens"] is True
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    code = ("import sys; from transformers import AutoTokenizer; "
            "t = AutoTokenizer.from_pretrained(sys.argv[1]); print(t('A.  Both')['input_ids'])")
    r = subprocess.run([sys.executable, "-c", code, str(hf)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[1, 319, 29889, 29871, 9134]"
    assert len(AutoTokenizer.from_pretrained(hf)) == 32000


def _docs_cache(shared_data: Path) -> Path:
    """Every (context, continuation) of the 80 tests, read once and kept in the test cache, keyed by
    the data files and parity's task code."""
    from parity.config import code_digest
    from parity.io import fingerprint_dir

    key = hashlib.sha256(f"{fingerprint_dir(shared_data)}{code_digest('tasks/*.py', 'tasks/*.json')}".encode())
    return Path(os.environ["PARITY_CACHE"]) / "tokenizer-docs" / f"{key.hexdigest()[:16]}.json"


def all_pairs(shared_data: Path) -> dict[str, list[list[list[str]]]]:
    from parity.io import write_json
    from parity.tasks.docs import load_docs
    from parity.tasks.registry import TESTS

    path = _docs_cache(shared_data)
    if not path.is_file():
        data = {t: [[list(p) for p in d.requests] for d in load_docs(t, str(shared_data)).docs] for t in TESTS}
        write_json(path, data, indent=None)
    return json.loads(path.read_text())


@pytest.mark.slow  # ~3 min of CPU on a cold cache (82 s reading the 37,166 documents, 90 s encoding)
def test_all_documents_encode_identically(shared_data, llama2_tokenizer, forms):
    """The HF directory parity writes, on every context and continuation of the 80 tests: the ids
    AutoTokenizer gives (lm-eval's split, BOS as the tokenizer adds it) are sentencepiece's, text by text
    (so request by request, under lm-eval's split and under parity's, which agree on every pair)."""
    from parity.tasks.tokenize import split_pair as parity_split

    data = all_pairs(shared_data)
    assert len(data) == 80 and sum(len(v) for v in data.values()) == 37166
    pairs = [tuple(p) for docs in data.values() for d in docs for p in d]
    assert all(split_pair(*p) == parity_split(*p) for p in pairs)
    texts = list(dict.fromkeys(s for c, k in (split_pair(*p) for p in pairs) for s in (c, c + k)))
    t0, c0 = time.perf_counter(), time.process_time()
    ref = load("sentencepiece", llama2_tokenizer).encode(texts)
    t1, c1 = time.perf_counter(), time.process_time()
    hf = load("hf", forms["exact"]).encode(texts)
    t2, c2 = time.perf_counter(), time.process_time()
    bad = [t for t, a, b in zip(texts, ref, hf) if a != b]
    print(f"\n{len(pairs)} pairs, {len(texts)} distinct texts, {sum(map(len, texts)) / 1e6:.1f}M chars: "
          f"sentencepiece {t1 - t0:.1f}s ({c1 - c0:.1f}s cpu), AutoTokenizer {t2 - t1:.1f}s ({c2 - c1:.1f}s cpu)")
    assert not bad, f"{len(bad)} texts differ, first {bad[0][:200]!r}"


# ---- `parity tokenizers`: the comparison without scoring --------------------------------------------

def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.strip()


def test_standalone_command(forms, llama2_tokenizer, tmp_path, capsys):
    base = ["tokenizers", "--reference", str(llama2_tokenizer), "--tests", "bigbench_general_knowledge,xcopa_en,boolq"]
    rc, out, err = run_cli(capsys, *base, "--other", str(forms["exact"]), "--json", str(tmp_path / "r.json"))
    assert rc == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["other"]["n_mismatches"] == 0 and result["other"]["n_requests"] > 0
    assert set(result["tokenizer_mismatches"]) == {"bigbench_general_knowledge", "xcopa_en", "boolq"}

    rc, out, err = run_cli(capsys, *base, "--other", str(forms["llama-class"]))
    assert rc == 1 and "bigbench_general_knowledge (" in err.splitlines()[-1] and "boolq" not in err, err
    assert "▁▁" in out and "29871" in out  # the example: both id lists and their pieces

    no_bos = tmp_path / "no-bos"
    shutil.copytree(forms["llama-class"], no_bos)
    cfg = json.loads((no_bos / "tokenizer_config.json").read_text())
    (no_bos / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False}))
    rc, out, err = run_cli(capsys, *base, "--other", str(no_bos), "--json", str(tmp_path / "nb.json"))
    nb = json.loads((tmp_path / "nb.json").read_text())["other"]
    assert rc == 1 and nb["n_mismatches"] == nb["n_requests"]  # every request lacks its BOS
    assert nb["examples"][0]["position"] == 0 and nb["examples"][0]["reference"]["ids"][0] == 1


def test_llama3_tiktoken_row(tmp_path):
    """The Llama 3 row of the table: llama-models' tiktoken model loads, BOS first, lm-eval's split."""
    import llama_models.llama3 as l3

    path = Path(l3.__file__).parent / "tokenizer.model"
    if not path.is_file():
        pytest.skip("llama-models ships no llama3 tokenizer.model")
    assert kind_of_file(path) == "tiktoken"
    enc = load("tiktoken", path)
    (req,) = encode_pairs(enc, [("Question: 2+2=\nAnswer:", " 4")])
    assert req.context[0] == enc.tok.bos_id and enc.tok.decode(list(req.continuation)) == " 4"
    assert enc.pieces(list(req.continuation)) == [" ", "4"]


# ---- bad input: one line naming the file, exit 2 ----------------------------------------------------

def test_bad_tokenizers_exit_2_naming_the_file(forms, llama2_tokenizer, tmp_path, capsys):
    base = ["tokenizers", "--reference", str(llama2_tokenizer), "--tests", "boolq"]
    broken = tmp_path / "broken"
    shutil.copytree(forms["exact"], broken)
    (broken / "tokenizer_config.json").write_text('{"tokenizer_class": ')
    rc, _, err = run_cli(capsys, *base, "--other", str(broken))
    assert rc == 2 and len(err.splitlines()) == 1 and str(broken / "tokenizer_config.json") in err, err

    garbage = tmp_path / "garbage"
    shutil.copytree(forms["exact"], garbage)
    (garbage / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    rc, _, err = run_cli(capsys, *base, "--other", str(garbage))
    assert rc == 2 and len(err.splitlines()) == 1 and "does not load" in err and "Traceback" not in err, err

    wrong_rows = tmp_path / "hf-wrong-rows"
    shutil.copytree(forms["exact"], wrong_rows)
    (wrong_rows / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 32064}))
    rc, _, err = run_cli(capsys, *base, "--other", str(wrong_rows))
    assert rc == 2 and "32000 tokens" in err and "32064" in err and str(wrong_rows / "tokenizer.json") in err, err


@pytest.fixture(scope="module")
def real_tok_checkpoints(tmp_path_factory, llama2_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    meta = cached_checkpoint("7b-mini", tokenizer=llama2_tokenizer)
    return {"meta": meta, "hf": convert("meta", "hf", meta, root / "hf"),
            "megatron": convert("meta", "megatron", meta, root / "megatron", target_tp=1)}


def _plan(run_dir: Path, ckpts: dict[str, Path], skip_bad_tokenizers: bool = False):
    from parity.config import Checkpoint
    from parity.run import Plan

    return Plan(run_dir, ["7b-mini"], list(ckpts), "meta", [], "fp32", "cpu", "auto", "local",
                {"7b-mini": {b: Checkpoint(p, b, 1, "flag") for b, p in ckpts.items()}},
                skip_bad_tokenizers=skip_bad_tokenizers)


def _data(tok: Path) -> dict:
    from parity.run import TestData
    from parity.tasks.docs import load_docs
    from parity.tasks.tokenize import build_requests

    out = {}
    for t in ("bigbench_general_knowledge", "xcopa_en"):
        ld = load_docs(t, None)
        out[t] = TestData(t, ld.docs, build_requests(ld.docs, tok), ld.source, 0)
    return out


def test_check_run_megatron_and_skip_bad(real_tok_checkpoints, llama2_tokenizer, tmp_path, monkeypatch):
    """check_run as `parity run` calls it: every backend's tokenizer (Megatron's through megatron-core,
    from its args), stored results reused (in the run, and from the cache by another run with the same
    inputs), a broken one exit 2 unless --skip-bad-tokenizers."""
    from parity.tokenizer_check import in_run
    from parity.tokenizer_check.carried import carried, load_carried
    from parity.tokenizer_check.in_run import check_run, report_section

    monkeypatch.setenv("PARITY_CACHE", str(tmp_path / "cache"))  # no check made by another test
    data = {"7b-mini": _data(llama2_tokenizer)}
    ckpts = dict(real_tok_checkpoints)
    plan = _plan(tmp_path / "run", ckpts)
    check_run(plan, data, progress=None)
    results = {b: json.loads(plan.layout.tokenizer_check("7b-mini", b).read_text()) for b in ckpts}
    assert results["meta"]["status"] == "reference file"
    assert results["megatron"]["status"] == "checked" and "Llama2Tokenizer" in results["megatron"]["description"]
    assert results["hf"]["status"] == "checked"
    for b in ckpts:
        assert all(v["n_mismatches"] == 0 for v in results[b]["tests"].values()), b
    meg = load_carried(carried("megatron", ckpts["megatron"]))  # examples show Megatron's own pieces
    assert meg.pieces(meg.encode(["x  y"])[0]) == ["<s>", "▁x", "▁", "▁y"]
    before = {b: plan.layout.tokenizer_check("7b-mini", b).stat().st_mtime_ns for b in ckpts}
    check_run(plan, data, progress=None)  # unchanged inputs: nothing recomputed
    assert before == {b: plan.layout.tokenizer_check("7b-mini", b).stat().st_mtime_ns for b in ckpts}
    # another results directory, the same inputs: the earlier run's checks, no tokenizer loaded
    with monkeypatch.context() as m:
        m.setattr(in_run, "load_carried", lambda c: pytest.fail(f"{c.kind} tokenizer loaded again"))
        said = []
        other = _plan(tmp_path / "other-run", ckpts)
        check_run(other, data, progress=said.append)
    again = {b: json.loads(other.layout.tokenizer_check("7b-mini", b).read_text()) for b in ckpts}
    for b in ckpts:
        assert again[b]["tests"] == results[b]["tests"] and again[b]["status"] == results[b]["status"], b
    assert sum("checked by an earlier run" in line for line in said) == 2  # hf and megatron (meta: same file)

    mg = tmp_path / "megatron-no-tok"
    shutil.copytree(ckpts["megatron"], mg)
    (mg / "tokenizer.model").unlink()
    hf = tmp_path / "hf-broken"
    shutil.copytree(ckpts["hf"], hf)
    (hf / "tokenizer.json").write_text("not json")
    for bad, name in ((mg, mg / "tokenizer.model"), (hf, hf / "tokenizer.json")):
        backend = "megatron" if bad == mg else "hf"
        ck = {**ckpts, backend: bad}
        plan = _plan(tmp_path / f"run-{backend}", ck)
        with pytest.raises(UserError, match=str(name)):
            check_run(plan, data, progress=None)
        check_run(_plan(plan.run_dir, ck, skip_bad_tokenizers=True), data, progress=None)
        manifest = {"sizes": ["7b-mini"], "backends": list(ck), "tests": dict.fromkeys(data["7b-mini"])}
        sec = report_section(plan.run_dir, manifest)
        assert sec["tokenizers"]["7b-mini"][backend]["status"] == "not checked"
        assert str(name) in sec["tokenizers"]["7b-mini"][backend]["note"]
        assert backend not in sec["tokenizer_mismatches"]["7b-mini"]
        with pytest.raises(UserError, match=str(name)):  # not reused: without the flag it stops again
            check_run(plan, data, progress=None)


# ---- a whole run: report.md, report.json, parity check ----------------------------------------------

def parity(*args, timeout=1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parity", *args], capture_output=True, text=True, timeout=timeout)


def test_run_with_a_wrong_hf_tokenizer(real_tok_checkpoints, llama2_tokenizer, tmp_path):
    """An HF checkpoint whose tokenizer is the tokenizers-backed LlamaTokenizer built from tokenizer.model
    (what parity wrote before): the run scores as before, its report shows the mismatches, `parity check`
    exits 1 naming hf and the tests; a tokenizer that does not load stops the run before scoring."""
    hf = tmp_path / "hf-llama-class"
    shutil.copytree(real_tok_checkpoints["hf"], hf)
    write_tokenizer_files(llama2_tokenizer, hf, 4096, "llama-class")
    common = ["run", "--sizes", "7b-mini", "--backends", "meta,hf", "--tests", "bigbench_general_knowledge,xcopa_en,boolq",
              "--checkpoint", f"7b-mini:meta={real_tok_checkpoints['meta']}"]
    out = tmp_path / "run"
    r = parity(*common, "--checkpoint", f"7b-mini:hf={hf}", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    counts = report["tokenizer_mismatches"]["7b-mini"]
    assert counts["hf"]["bigbench_general_knowledge"] > 0 and counts["hf"]["xcopa_en"] > 0
    assert counts["meta"] == {"bigbench_general_knowledge": 0, "xcopa_en": 0, "boolq": 0}
    md = (out / "report.md").read_text()
    assert "## Tokenizers" in md and "First requests that differ, 7b-mini / hf" in md and "▁▁" in md
    r = parity("check", str(out))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "7b-mini/hf/bigbench_general_knowledge (tokenizer mismatches)" in r.stderr
    for test, n in counts["hf"].items():
        assert (f"7b-mini/hf/{test} (tokenizer mismatches)" in r.stderr) == (n > 0), test
    r = parity("check", str(out), "--max-tokenizer-mismatches", "100000")
    assert r.returncode == 0, r.stdout + r.stderr

    (hf / "tokenizer_config.json").write_text("{")
    bad = tmp_path / "run-bad"
    t0 = time.perf_counter()
    r = parity(*common, "--checkpoint", f"7b-mini:hf={hf}", "--out", str(bad))
    assert r.returncode == 2, r.stderr[-3000:]
    assert str(hf / "tokenizer_config.json") in r.stderr.splitlines()[-1] and "Traceback" not in r.stderr
    assert not list(bad.glob("7b-mini/*/*.jsonl")), "scored before the tokenizer check"
    assert time.perf_counter() - t0 < 600
