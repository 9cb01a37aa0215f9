"""xquant: convert and quantize LLaMA-family checkpoints, streaming tensor by tensor."""

__version__ = "0.1.0"
