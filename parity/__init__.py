"""parity: numerical parity harness for Llama-2 across Meta's reference, Hugging Face and Megatron."""

__version__ = "0.1.0"
# Bumped when the layout or meaning of stored results changes; results of another version are refused.
RESULTS_FORMAT = 1
