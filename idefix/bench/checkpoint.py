"""Random-weight checkpoints with the real shapes of the family, in hub format, written without transformers.

    python -m idefix.bench.checkpoint smolvlm-256m /tmp/smolvlm-256m

The tokenizer is a small demo-style BPE (the model keeps its real vocabulary size), so the files load in
idefix, transformers and mistral.rs alike. Tensors are generated one at a time and written in shards of at
most 2 GiB (with `model.safetensors.index.json`, as the hub ships big models), so even the 8B shape is
written in a few GiB of memory. Weights are stored in bf16 by default, as the hub checkpoints are.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from idefix.demo.vocab import EOS, train_bpe, write_tokenizer_files
from idefix.model.config import Idefics3Config
from idefix.model.idefics3 import Idefics3Model

SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14)
SIGLIP_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16)
SMOL_TEXT = dict(head_dim=64, vocab_size=49280, rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5)

# Shapes from FACTS.md (256m, 8b) and the published configs. Not verified against the hub files here:
# smolvlm-2b's processor longest_edge (1536 = 4 x 384) and max_position_embeddings (16384); idefics3-8b's
# rope scaling (Llama 3.1 ships llama3 rope with a 131072 context; plain rope here, same cost per token)
# and longest_edge (4 x 364). None of these change the cost of a decode step or of a tile.
SHAPES: dict[str, dict[str, Any]] = {
    "smolvlm-256m": dict(
        text=dict(SMOL_TEXT, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3),
        vision=dict(SIGLIP_B16, image_size=512),
        scale_factor=4, longest_edge=2048, tie=False,
    ),
    "smolvlm-500m": dict(
        text=dict(SMOL_TEXT, hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                  num_key_value_heads=5),
        vision=dict(SIGLIP_B16, image_size=512),
        scale_factor=4, longest_edge=2048, tie=False,
    ),
    "smolvlm-2b": dict(  # SmolVLM-Instruct: SmolLM2-1.7B + SigLIP so400m at 384 px, 81 tokens per tile
        text=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                  num_key_value_heads=32, head_dim=64, vocab_size=49155, rope_theta=273768.0,
                  max_position_embeddings=16384, rms_norm_eps=1e-5),
        vision=dict(SO400M, image_size=384),
        scale_factor=3, longest_edge=1536, tie=False,
    ),
    "tiny": dict(  # a toy for smoke tests (tests/bench): every code path in seconds
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=512, rope_theta=10000.0,
                  max_position_embeddings=2048, rms_norm_eps=1e-5),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=16,
                    image_size=64),
        scale_factor=2, longest_edge=128, tie=False,
    ),
    "idefics3-8b": dict(  # Idefics3-8B-Llama3: Llama 3 8B + SigLIP so400m at 364 px, 169 tokens per tile
        text=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=128259, rope_theta=500000.0,
                  max_position_embeddings=8192, rms_norm_eps=1e-5),
        vision=dict(SO400M, image_size=364),
        scale_factor=2, longest_edge=1456, tie=False,
    ),
}  # fmt: skip

TEXT_FIELDS = dict(model_type="llama", hidden_act="silu", attention_bias=False, mlp_bias=False, pretraining_tp=1)
VISION_FIELDS = dict(model_type="idefics3_vision", hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, num_channels=3)
SHARD_BYTES = 2 * 2**30
FORMAT = "3"  # bumped when the files written change: cached checkpoints of another format are rewritten
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def default_cache_dir() -> Path:
    return Path(os.environ.get("IDEFIX_BENCH_CACHE", Path.home() / ".cache" / "idefix" / "bench"))


def random_checkpoint(shape: str, cache_dir: str | Path | None = None, dtype: str = "bf16") -> Path:
    """The folder of `shape`'s random checkpoint under `cache_dir`, written on first use."""
    out = Path(cache_dir or default_cache_dir()) / f"{shape}-{dtype}"
    marker = out / ".complete"
    if marker.exists() and marker.read_text() == FORMAT:
        return out
    if out.exists():
        shutil.rmtree(out)  # an interrupted earlier write, or an older format
    write_random_checkpoint(shape, out, dtype=DTYPES[dtype])
    marker.write_text(FORMAT)
    return out


def write_random_checkpoint(shape: str, out: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    spec, out = SHAPES[shape], Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe(["How many circles are there? What colour is the square? Describe the image."] * 8, 300)
    tokenizer = _pad_vocabulary(tokenizer, spec["text"]["vocab_size"])
    write_tokenizer_files(tokenizer, out, model_max_length=spec["text"]["max_position_embeddings"])
    image_id, eos = tokenizer.token_to_id("<image>"), tokenizer.token_to_id(EOS)
    raw = {
        "model_type": "idefics3",
        "architectures": ["Idefics3ForConditionalGeneration"],
        "image_token_id": image_id,
        "scale_factor": spec["scale_factor"],
        "tie_word_embeddings": spec["tie"],
        # every field the hub configs carry (mistral.rs requires them even where transformers has defaults)
        "text_config": {**TEXT_FIELDS, **spec["text"], "tie_word_embeddings": spec["tie"]},
        "vision_config": {**VISION_FIELDS, **spec["vision"]},
    }
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    config = Idefics3Config.from_dict(raw)
    with torch.device("meta"):
        names = {k: tuple(v.shape) for k, v in Idefics3Model(config).state_dict().items()}
    if spec["tie"]:
        names.pop("lm_head.weight")
    _write_weights(names, out, seed, dtype)
    _write_processor_files(spec, out, config.image_seq_len)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": eos}))
    return out


def _pad_vocabulary(tokenizer: Tokenizer, vocab_size: int) -> Tokenizer:
    """The tokenizer with plain BPE entries `<tN>` up to the model's vocabulary, so every id a random model
    picks decodes to text (mistral.rs streams no chunk for a token without text, and skips added tokens)."""
    data = json.loads(tokenizer.to_str())
    vocab, start = data["model"]["vocab"], tokenizer.get_vocab_size()
    vocab.update({f"<t{i}>": start + i for i in range(vocab_size - start)})
    return Tokenizer.from_str(json.dumps(data))


def _write_weights(shapes: dict[str, tuple[int, ...]], out: Path, seed: int, dtype: torch.dtype) -> None:
    """Weights ~ N(0, 0.02), biases 0, norm scales 1; shards of at most SHARD_BYTES."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    generator = torch.Generator().manual_seed(seed)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for file, shard in zip(files, shards, strict=True):
        state = {name: _random_tensor(name, shapes[name], generator).to(dtype) for name in shard}
        save_file(state, out / file, metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(torch.Size(s).numel() * dtype.itemsize for s in shapes.values())
        weight_map = {name: file for file, shard in zip(files, shards, strict=True) for name in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if len(shape) > 1:
        return torch.empty(shape).normal_(0.0, 0.02, generator=generator)
    return torch.zeros(shape) if name.endswith("bias") else torch.ones(shape)


def _write_processor_files(spec: dict[str, Any], out: Path, image_seq_len: int) -> None:
    preprocessor = {
        "image_processor_type": "Idefics3ImageProcessor",
        "do_image_splitting": True,
        "resample": 1,
        "size": {"longest_edge": spec["longest_edge"]},
        "max_image_size": {"longest_edge": spec["vision"]["image_size"]},
        "do_convert_rgb": True,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
        "do_pad": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    processor = {"image_seq_len": image_seq_len, "processor_class": "Idefics3Processor"}
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    args = parser.parse_args()
    write_random_checkpoint(args.shape, args.out, dtype=DTYPES[args.dtype])
    print(args.out)


if __name__ == "__main__":
    main()
