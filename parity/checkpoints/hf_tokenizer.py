"""The tokenizer files of an HF checkpoint directory, in the forms parity can write (FORMS).

"exact" (what `parity convert --to hf` writes): tokenizer.model (Meta's, unchanged) + a tokenizer.json
that encodes exactly as sentencepiece does, loaded by `AutoTokenizer.from_pretrained(dir)` offline
(no sentencepiece, no protobuf needed). docs/tokenizers.md says why this form and not the others:

- BPE merges ranked by sentencepiece's piece score (ties: piece id, then split point). sentencepiece
  merges the adjacent pair whose result has the highest score; transformers' own conversion ranks merges
  by piece id, and Llama-2 gives its 16 whitespace-only pieces the lowest score (-1e9) but low ids, so
  "x  y" became [▁x, ▁▁, y] instead of sentencepiece's [▁x, ▁, ▁y].
- normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer: sentencepiece's dummy prefix is added
  to every text, also one that starts with a space (" A" -> [▁, ▁A]); Metaspace's "first" scheme
  skips it there.
- tokenizer_class "PreTrainedTokenizerFast": loads tokenizer.json as written. "LlamaTokenizer" would
  rebuild the pre-tokenizer from its own defaults (transformers 5) and lose the dummy-prefix rule.
- split_special_tokens: sentencepiece encodes the text "<s>" as characters, never as BOS.

Llama 3's tiktoken model (a tokenizer.model of kind "tiktoken") has one form, "exact" too: tokenizer.json
from transformers' own TikTokenConverter (byte-level BPE, merges from the ranks, Llama 3's split regex),
the 256 special tokens at their llama-models ids, BOS <|begin_of_text|> added by the post-processor,
split_special_tokens (tiktoken, as Meta's encode calls it, encodes a special token's text as text).

"llama-class" is what parity wrote before (tokenizer.model + LlamaTokenizer config) and "hub" the
layout Meta's HF releases ship (tokenizer.json from transformers' own slow-to-fast conversion +
LlamaTokenizer config); both are kept to show and test what the tokenizer check finds in them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from parity.errors import UserError
from parity.io import write_json

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6  # sentencepiece ModelProto.SentencePiece.Type
BPE = 2  # TrainerSpec.ModelType


def _proto(tok: Path):
    from sentencepiece import sentencepiece_model_pb2

    m = sentencepiece_model_pb2.ModelProto()
    try:
        m.ParseFromString(tok.read_bytes())
    except Exception as e:  # protobuf's DecodeError and friends
        raise UserError(f"{tok}: not a sentencepiece model ({str(e)[:120]})") from None
    return m


def _unsupported(m) -> str | None:
    """A setting of the sentencepiece model that the tokenizer.json below would not reproduce."""
    n = m.normalizer_spec
    if m.trainer_spec.model_type != BPE:
        return "a non-BPE model type"
    if n.precompiled_charsmap:
        return f"the normalization rule {n.name!r}"
    if n.remove_extra_whitespaces:
        return "remove_extra_whitespaces"
    if not n.escape_whitespaces:
        return "escape_whitespaces off"
    if any(p.type == USER_DEFINED for p in m.pieces):
        return "user-defined pieces"
    return None


def sentencepiece_equivalent(tok: Path):
    """A `tokenizers.Tokenizer` that encodes every text as sentencepiece encodes it, BOS added."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    m = _proto(tok)
    why = _unsupported(m)
    if why:
        raise UserError(f"{tok}: the sentencepiece model uses {why}, which parity's tokenizer.json writer "
                        f"does not reproduce (it handles Llama-2-style BPE models)")
    vocab = {p.piece: i for i, p in enumerate(m.pieces)}
    normal = {p.piece: (p.score, i) for i, p in enumerate(m.pieces) if p.type == NORMAL}
    ranked = []
    for piece, (score, i) in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-score, i, k, left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    unk = m.trainer_spec.unk_piece or "<unk>"
    t = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                             byte_fallback=m.trainer_spec.byte_fallback))
    prefix = [normalizers.Prepend("▁")] if m.normalizer_spec.add_dummy_prefix else []
    t.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if m.normalizer_spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    t.decoder = decoders.Sequence(steps)
    bos = m.pieces[m.trainer_spec.bos_id].piece if m.trainer_spec.bos_id >= 0 else None
    if bos is not None:
        t.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, m.trainer_spec.bos_id)])
    t.add_special_tokens([AddedToken(p.piece, normalized=False, special=True)
                          for p in m.pieces if p.type == CONTROL or p.piece == unk])
    return t


def _config(max_len: int, **extra) -> dict:
    return {**extra, **SPECIAL, "pad_token": None, "add_bos_token": True, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": max_len}


def _copy_model(tok: Path, out: Path) -> None:
    if Path(tok).resolve() != (out / "tokenizer.model").resolve():
        shutil.copyfile(tok, out / "tokenizer.model")


def write_exact(tok: Path, out: Path, max_len: int) -> None:
    _copy_model(tok, out)
    sentencepiece_equivalent(tok).save(str(out / "tokenizer.json"))
    write_json(out / "special_tokens_map.json", SPECIAL)
    write_json(out / "tokenizer_config.json", _config(
        max_len, tokenizer_class="PreTrainedTokenizerFast", split_special_tokens=True))


def write_llama_class(tok: Path, out: Path, max_len: int) -> None:
    """parity's earlier form: transformers builds a tokenizers-backed LlamaTokenizer from tokenizer.model."""
    _copy_model(tok, out)
    write_json(out / "special_tokens_map.json", SPECIAL)
    write_json(out / "tokenizer_config.json", _config(
        max_len, tokenizer_class="LlamaTokenizer", legacy=True, sp_model_kwargs={}))


def write_hub(tok: Path, out: Path, max_len: int) -> None:
    """The layout of Meta's HF releases (tokenizer.json + tokenizer.model + LlamaTokenizer config,
    legacy false), its tokenizer.json made by the installed transformers' own slow-to-fast
    conversion (parity cannot download the published file; docs/tokenizers.md)."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_llama_class(tok, Path(tmp), max_len)
        AutoTokenizer.from_pretrained(tmp).backend_tokenizer.save(str(out / "tokenizer.json"))
    _copy_model(tok, out)
    write_json(out / "special_tokens_map.json", SPECIAL)
    write_json(out / "tokenizer_config.json", _config(
        max_len, tokenizer_class="LlamaTokenizer", legacy=False, sp_model_kwargs={}, padding_side="right"))


def tiktoken_equivalent(tok: Path):
    """A `tokenizers.Tokenizer` encoding as llama-models' tiktoken Tokenizer does, BOS added (built once per
    tokenizer.model, then read from the cache: the conversion walks all 128000 ranks)."""
    from tokenizers import Tokenizer

    from parity.io import build_lock, cache_dir, sha256_file

    cached = cache_dir() / "tokenizers" / f"tiktoken-hf-{sha256_file(tok)[:16]}.json"
    if cached.is_file():
        return Tokenizer.from_file(str(cached))
    with build_lock(cached):
        if cached.is_file():
            return Tokenizer.from_file(str(cached))
        return _convert_tiktoken(tok, cached)


def _convert_tiktoken(tok: Path, cached: Path):
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from parity.io import atomic_file
    from parity.tokenizer import load_tokenizer

    meta = load_tokenizer(tok).tok
    specials = sorted(meta.special_tokens.items(), key=lambda kv: kv[1])
    t = TikTokenConverter(vocab_file=str(tok), pattern=meta.pat_str,
                          extra_special_tokens=[name for name, _ in specials]).converted()
    for name, i in specials:
        if t.token_to_id(name) != i:
            raise UserError(f"{tok}: special token {name} lands on id {t.token_to_id(name)}, not {i}, in the "
                            f"converted tokenizer; the tiktoken model is not Llama 3's layout")
    bos = meta.special_tokens["<|begin_of_text|>"]
    t.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|>:0 $A:0", pair="<|begin_of_text|>:0 $A:0 <|begin_of_text|>:1 $B:1",
        special_tokens=[("<|begin_of_text|>", bos)])
    cached.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(cached) as f:
        f.write(t.to_str())
    return t


LLAMA3_SPECIAL = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}


def write_tiktoken_exact(tok: Path, out: Path, max_len: int) -> None:
    _copy_model(tok, out)
    tiktoken_equivalent(tok).save(str(out / "tokenizer.json"))
    write_json(out / "special_tokens_map.json", LLAMA3_SPECIAL)
    write_json(out / "tokenizer_config.json", {
        **LLAMA3_SPECIAL, "pad_token": None, "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": max_len,
        "tokenizer_class": "PreTrainedTokenizerFast", "split_special_tokens": True})


# tokenizer.model kind (parity.tokenizer.KINDS) -> form -> writer
FORMS = {"exact": write_exact, "llama-class": write_llama_class, "hub": write_hub}
KIND_FORMS = {"sentencepiece": FORMS, "tiktoken": {"exact": write_tiktoken_exact}}
DEFAULT_FORM = "exact"


def write_tokenizer_files(tok: Path, out: Path, max_len: int, form: str = DEFAULT_FORM) -> None:
    """tokenizer.model + the HF tokenizer files of `form` into the directory `out`."""
    from parity.tokenizer import kind_of_file

    forms = KIND_FORMS[kind_of_file(tok)]
    if form not in forms:
        raise UserError(f"unknown HF tokenizer form {form!r} for {tok}; choose from {', '.join(forms)}")
    for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / stale).unlink(missing_ok=True)
    forms[form](Path(tok), Path(out), max_len)
