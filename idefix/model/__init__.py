"""The Idefics3 model family in plain PyTorch: SigLIP vision tower, pixel-shuffle connector, Llama decoder."""
