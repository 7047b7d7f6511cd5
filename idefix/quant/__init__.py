"""Quantization: GGML block formats, quantized linear layers, UQFF files."""
