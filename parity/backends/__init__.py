"""Inference stacks behind one interface (base.Backend): meta (llama_models + fairscale), hf
(transformers), megatron (megatron-core GPTModel). worker.py runs one of them on a job file, in its
own process group: `launch(job, nproc)` starts it (torchrun when nproc > 1).

Imports stay lazy: importing this package loads no model stack.
"""
