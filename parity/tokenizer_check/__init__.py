"""Tokenizer parity: do the stacks' own tokenizers encode like the reference that parity scores with?

parity scores every backend on the same ids (tasks/tokenize.py). A user of a converted checkpoint
tokenizes with the checkpoint's own tokenizer instead; this package tells where that one differs.

    encoders.py   how each stack's users encode text: one row per tokenizer kind (KINDS)
    carried.py    which tokenizer a checkpoint carries (by format), loaded and checked against its vocab
    compare.py    one tokenizer against the reference ids, per test: counts and first examples
    in_run.py     the hooks of `parity run` / `report` / `check` (RUN/tokenizers/<size>/<backend>.json)
    render.py     the report's "Tokenizers" section
    cli.py        `parity tokenizers --reference TOKENIZER --other X`
"""
