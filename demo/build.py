"""Build the demo model folder: tokenizer, processor files and a fresh Idefics3 config (used by train.py).

Everything is written as the hub ships SmolVLM (hand-written JSON, not `save_pretrained`), so the training
inputs come from `AutoProcessor.from_pretrained(folder)` exactly as at inference time.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from idefix.demo import scenes
from idefix.demo.vocab import BOS, EOS, PAD, train_bpe, write_tokenizer_files

TILE = 64  # max_image_size.longest_edge: one vision-encoder tile
LONGEST_EDGE = 128  # size.longest_edge: images become at most 2x2 tiles + the global view
PATCH, SCALE_FACTOR = 8, 2
IMAGE_SEQ_LEN = (TILE // PATCH) ** 2 // SCALE_FACTOR**2  # 16 tokens per tile after pixel shuffle
VOCAB_SIZE = 512

# Sized for a ~1 hour CPU training run on 2 shared cores: ~2.7M parameters.
VISION = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 3, "num_attention_heads": 2}
TEXT = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def corpus(seed: int, n: int) -> list[str]:
    """Rendered conversations (no image tokens) to learn BPE merges for the questions and answers."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        example = scenes.make_example(rng, rng.choice(scenes.ALL_KINDS))
        texts.append("".join(f"User: {q}{EOS}\nAssistant: {a}{EOS}\n" for q, a in example.turns))
    return texts


def write_processor_files(out: Path) -> None:
    preprocessor = {
        "do_convert_rgb": True,
        "do_image_splitting": True,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "Idefics3ImageProcessor",
        "max_image_size": {"longest_edge": TILE},
        "processor_class": "Idefics3Processor",
        "resample": 1,  # LANCZOS, as SmolVLM ships it
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": LONGEST_EDGE},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    processor = {"image_seq_len": IMAGE_SEQ_LEN, "processor_class": "Idefics3Processor"}
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def token_ids(out: Path) -> dict[str, int]:
    vocab = json.loads((out / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    return {
        "bos": added[BOS],
        "eos": added[EOS],
        "pad": added[PAD],
        "image": added["<image>"],
        "vocab_size": len(vocab["model"]["vocab"]) + len(vocab["added_tokens"]),
    }


def model_config(ids: dict[str, int]) -> dict:
    """Idefics3 config.json contents, with hub-era flat keys (rope_theta) in the text config."""
    vision = {
        "model_type": "idefics3_vision",
        "image_size": TILE,
        "patch_size": PATCH,
        "num_channels": 3,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
        **VISION,
    }
    text = {
        "model_type": "llama",
        "vocab_size": ids["vocab_size"],
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "head_dim": TEXT["hidden_size"] // TEXT["num_attention_heads"],
        **TEXT,
    }
    return {
        "architectures": ["Idefics3ForConditionalGeneration"],
        "model_type": "idefics3",
        "image_token_id": ids["image"],
        "scale_factor": SCALE_FACTOR,
        "tie_word_embeddings": False,
        "vision_config": vision,
        "text_config": text,
        "pad_token_id": ids["pad"],
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "torch_dtype": "float32",
    }


def write_generation_config(out: Path, ids: dict[str, int]) -> None:
    config = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}
    (out / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n")


def build_folder(out: Path, seed: int) -> dict:
    """Write tokenizer + processor + generation files into `out`; return the model config dict."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe(corpus(seed, 20000), VOCAB_SIZE)
    write_tokenizer_files(tokenizer, out, model_max_length=2048)
    write_processor_files(out)
    ids = token_ids(out)
    write_generation_config(out, ids)
    config = model_config(ids)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config
