"""Random-weight Idefics3 checkpoints in hub format, built with `transformers` (test-only).

Each spec covers a corner of the family: patch 14 / 16, scale_factor 2 / 3 / 4, tied and untied
embeddings, GQA and MHA, image splitting on and off, and both on-disk layouts (what transformers 5
`save_pretrained` writes, and the hub-era files with flat `rope_theta`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from idefix.demo.vocab import EOS, train_bpe, write_tokenizer_files

CORPUS = [
    "What is in this image? A red circle and two blue squares on a white background.",
    "Describe the picture in one sentence, please. The cat sat on the mat near the door.",
    "How many triangles are there? There are three triangles: one green, one yellow, one purple.",
    "Numbers 0123456789, punctuation .,;:!? and unicode: café, naïve, 你好, 🙂, Ελληνικά.",
    "User: hello Assistant: hi there! System: you are a helpful assistant.",
]


@dataclass(frozen=True)
class Spec:
    name: str
    patch: int
    tile: int  # vision image_size == processor max_image_size
    scale: int
    heads: int
    kv_heads: int
    tied: bool
    split: bool
    longest_edge: int
    hub_era: bool = False
    rope: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default"})
    intermediate: int = 96
    vision_hidden: int = 48
    vision_intermediate: int = 64

    @property
    def image_seq_len(self) -> int:
        return (self.tile // self.patch) ** 2 // self.scale**2


SPECS = [
    Spec(
        "p16-s2-gqa-untied-split",
        patch=16,
        tile=64,
        scale=2,
        heads=4,
        kv_heads=2,
        tied=False,
        split=True,
        longest_edge=128,
    ),
    Spec(
        "p14-s3-mha-tied-split-hub",
        patch=14,
        tile=126,
        scale=3,
        heads=4,
        kv_heads=4,
        tied=True,
        split=True,
        longest_edge=252,
        hub_era=True,
        rope={"rope_type": "linear", "factor": 2.0},
    ),
    Spec(
        "p16-s4-gqa-untied-nosplit-hub",
        patch=16,
        tile=128,
        scale=4,
        heads=6,
        kv_heads=2,
        tied=False,
        split=False,
        longest_edge=256,
        hub_era=True,
        rope={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    Spec(
        "p14-s2-mha-tied-split",
        patch=14,
        tile=56,
        scale=2,
        heads=2,
        kv_heads=2,
        tied=True,
        split=True,
        longest_edge=168,
    ),
]

# 256-wide layers so every K type applies without fallback.
WIDE = Spec("wide", patch=16, tile=64, scale=2, heads=16, kv_heads=4, tied=False, split=True, longest_edge=128,
            intermediate=512, vision_hidden=256, vision_intermediate=512)  # fmt: skip


def build_checkpoint(spec: Spec, out: Path, seed: int = 0) -> Path:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    tokenizer = train_bpe(CORPUS * 4, vocab_size=420)
    write_tokenizer_files(tokenizer, out, model_max_length=4096)
    vocab = ((tokenizer.get_vocab_size() + 63) // 64) * 64
    eos, image = tokenizer.token_to_id(EOS), tokenizer.token_to_id("<image>")
    head_dim = 16
    text = dict(
        model_type="llama",
        hidden_size=head_dim * spec.heads,
        intermediate_size=spec.intermediate,
        num_hidden_layers=2,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        vocab_size=vocab,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=spec.tied,
        rope_parameters={"rope_theta": 10000.0, **spec.rope},
        bos_token_id=None,
        eos_token_id=eos,
    )
    vision = dict(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=2,
        num_attention_heads=spec.vision_hidden // 16,
        image_size=spec.tile,
        patch_size=spec.patch,
    )
    config = Idefics3Config(
        text_config=text,
        vision_config=vision,
        scale_factor=spec.scale,
        image_token_id=image,
        tie_word_embeddings=spec.tied,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    with torch.no_grad():  # larger weights than the default init: logits far apart, greedy choices unambiguous
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.08)
    model.save_pretrained(out)
    _write_processor_files(spec, out)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": eos}))
    if spec.hub_era:
        _to_hub_era_layout(out)
    return out


def _write_processor_files(spec: Spec, out: Path) -> None:
    preprocessor = {
        "image_processor_type": "Idefics3ImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"longest_edge": spec.longest_edge},
        "resample": 1,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_pad": True,
        "do_image_splitting": spec.split,
        "max_image_size": {"longest_edge": spec.tile},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    processor = {"image_seq_len": spec.image_seq_len, "processor_class": "Idefics3Processor"}
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))


def _to_hub_era_layout(out: Path) -> None:
    """Rewrite config.json as pre-transformers-5 checkpoints have it: flat rope_theta + rope_scaling."""
    config = json.loads((out / "config.json").read_text())
    text = config["text_config"]
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope.pop("rope_theta")
    if rope["rope_type"] != "default":
        text["rope_scaling"] = rope
    text.pop("head_dim", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template")  # hub-era files keep it in chat_template.json only
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
