"""Random-weight checkpoints with the real shapes of the family, written in hub format without transformers.

    python -m benchmarks.random_checkpoint smolvlm-256m /tmp/smolvlm-256m

The tokenizer is the small demo-style BPE (the model keeps its real vocabulary size), so the files load
in idefix and in transformers alike.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from idefix.demo.vocab import EOS, train_bpe, write_tokenizer_files
from idefix.model.config import Idefics3Config
from idefix.model.idefics3 import Idefics3Model

SHAPES: dict[str, dict] = {
    "smolvlm-256m": dict(
        text=dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            vocab_size=49280,
            rope_theta=100000.0,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
        ),
        vision=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            patch_size=16,
            image_size=512,
        ),
        scale_factor=4,
        longest_edge=2048,
        tie=False,
    ),
    "smolvlm-500m": dict(
        text=dict(
            hidden_size=960,
            intermediate_size=2560,
            num_hidden_layers=32,
            num_attention_heads=15,
            num_key_value_heads=5,
            head_dim=64,
            vocab_size=49280,
            rope_theta=100000.0,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
        ),
        vision=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            patch_size=16,
            image_size=512,
        ),
        scale_factor=4,
        longest_edge=2048,
        tie=False,
    ),
}


def write_random_checkpoint(shape: str, out: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    spec, out = SHAPES[shape], Path(out)
    tokenizer = train_bpe(["How many circles are there? What colour is the square? Describe the image."] * 8, 300)
    write_tokenizer_files(tokenizer, out, model_max_length=spec["text"]["max_position_embeddings"])
    image_id, eos = tokenizer.token_to_id("<image>"), tokenizer.token_to_id(EOS)
    raw = {
        "model_type": "idefics3",
        "architectures": ["Idefics3ForConditionalGeneration"],
        "image_token_id": image_id,
        "scale_factor": spec["scale_factor"],
        "tie_word_embeddings": spec["tie"],
        "text_config": {"model_type": "llama", **spec["text"], "tie_word_embeddings": spec["tie"]},
        "vision_config": {"model_type": "idefics3_vision", **spec["vision"]},
    }
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    config = Idefics3Config.from_dict(raw)
    torch.manual_seed(seed)
    model = Idefics3Model(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.dim() > 1:
                param.normal_(0.0, 0.02)
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    if spec["tie"]:
        state.pop("lm_head.weight")
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    tile = spec["vision"]["image_size"]
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Idefics3ImageProcessor",
                "do_image_splitting": True,
                "resample": 1,
                "size": {"longest_edge": spec["longest_edge"]},
                "max_image_size": {"longest_edge": tile},
                "do_convert_rgb": True,
                "do_resize": True,
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": [0.5] * 3,
                "image_std": [0.5] * 3,
                "do_pad": True,
            },
            indent=2,
        )
    )
    (out / "processor_config.json").write_text(json.dumps({"image_seq_len": config.image_seq_len}))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": eos}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    write_random_checkpoint(args.shape, args.out, dtype=torch.float32 if args.dtype == "fp32" else torch.bfloat16)
    print(args.out)


if __name__ == "__main__":
    main()
