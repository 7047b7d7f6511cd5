"""idefix: fast local inference for Idefics3 / SmolVLM vision-language models."""

__version__ = "0.1.0"
