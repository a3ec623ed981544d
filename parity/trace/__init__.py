"""Aligned capture of a stack's internals and `parity explain`: where two stacks part.

boundaries.py  the stack-neutral boundaries, in forward order (the one list every stack must fill)
stacks.py      per stack: which module of its own model each boundary is hooked on, and how its tensor
               is brought into the canonical (Meta) layout
capture.py     the tracing mode: forward hooks on a loaded backend's model, TP shards gathered
worker.py      a Job's trace units, run in the ordinary worker (`parity score`, torchrun for TP > 1)
compare.py     boundary-by-boundary differences, the noise each is held against, the first divergence
explain.py     `parity explain`: request, checkpoints, two captures, table, plot, json
corpus.py      converter bugs injected into converted checkpoints (tests and the README's transcript)
"""
