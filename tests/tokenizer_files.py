"""Tiny tokenizer folders for the text-processing tests: SmolVLM style, Idefics3-8B (Llama 3) style, and a
Llama-2 style Metaspace / byte-fallback one. Each builds in a few milliseconds."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

from idefix.demo.vocab import train_bpe, write_tokenizer_files

CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog. User: Assistant: Describe the image.",
    "What is in this picture? A cat sitting on a red sofa next to 2 dogs and 13 birds.",
    "Mixed scripts: café naïve résumé, 日本語のテキスト, 你好世界, emoji 😀🎉👍.",
] * 10
ASCII_CORPUS = [line for line in CORPUS if line.isascii()]

BEGIN_OF_TEXT = "<|begin_of_text|>"
# The HuggingFaceM4/Idefics3-8B-Llama3 template: SmolVLM's, opening with Llama 3's BOS instead.
IDEFICS3_8B_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_smolvlm(out_dir: Path, corpus: list[str] = CORPUS, vocab_size: int = 420) -> Path:
    """SmolVLM-like files: ByteLevel BPE, no BOS added, chat_template.json + tokenizer_config template."""
    write_tokenizer_files(train_bpe(corpus, vocab_size), out_dir, model_max_length=8192)
    return out_dir


def build_llama3(out_dir: Path, add_bos_token: bool | None = None) -> Path:
    """Idefics3-8B-like files: <|begin_of_text|> added by a TemplateProcessing post-processor, as in
    Llama 3's tokenizer.json; tokenizer_config names PreTrainedTokenizerFast."""
    tokenizer = train_bpe(CORPUS, 420)
    tokenizer.add_special_tokens([BEGIN_OF_TEXT])
    bos_id = tokenizer.token_to_id(BEGIN_OF_TEXT)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BEGIN_OF_TEXT} $A",
                pair=f"{BEGIN_OF_TEXT} $A {BEGIN_OF_TEXT} $B:1",
                special_tokens=[(BEGIN_OF_TEXT, bos_id)],
            ),
        ]
    )
    write_tokenizer_files(tokenizer, out_dir, model_max_length=8192)
    config = json.loads((out_dir / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", bos_token=BEGIN_OF_TEXT)
    config.update(chat_template=IDEFICS3_8B_TEMPLATE)
    if add_bos_token is not None:
        config["add_bos_token"] = add_bos_token
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": IDEFICS3_8B_TEMPLATE}))
    return out_dir


def build_metaspace(out_dir: Path) -> Path:
    """Llama-2-like files: Metaspace normalizer, byte-fallback BPE, a decoder that strips the first space."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<s>", "</s>", *byte_tokens], show_progress=False)
    tokenizer.train_from_iterator(ASCII_CORPUS, trainer=trainer)
    data = json.loads(tokenizer.to_str())
    # Byte tokens belong to the model's vocabulary, not to the (special) added tokens.
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in ("<s>", "</s>")]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(json.dumps(data))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return out_dir
