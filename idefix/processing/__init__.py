"""Prompt and image preprocessing: chat template, tokenizer, Idefics3 image tiles."""
