"""Quantizers: LLM.int8 and NF4 (bitsandbytes layout), GPTQ, GGUF k-quants."""
