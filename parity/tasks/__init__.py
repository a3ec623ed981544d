"""The 80 tests: registry and the table of data kinds (registry.py), readers for the published data
formats (formats.py), prompts as lm-eval (lmeval.py) and BIG-bench (bigbench.py) build them, documents
(docs.py), token ids (tokenize.py), bundled samples (samples/, same layout as a --data-dir) and
`parity tasks` (cli.py).

Kept import-free on purpose: `parity tasks` must not pay for lm-eval / datasets.
"""
