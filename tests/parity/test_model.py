"""Our model against transformers' Idefics3ForConditionalGeneration on generated checkpoints (fp32)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from idefix import native
from idefix.model import siglip
from idefix.model.attention import AttentionBatch
from idefix.model.idefics3 import Idefics3Model
from idefix.model.layers import Bf16Linear
from idefix.model.weights import load_model
from tests.checkpoints import Spec

transformers = pytest.importorskip("transformers")

STEPS = 32
TOL = 1e-4


def _images() -> list[Image.Image]:
    gen = torch.Generator().manual_seed(1)
    wide = (torch.rand(70, 150, 3, generator=gen) * 255).to(torch.uint8).numpy()
    tall = (torch.rand(130, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()
    return [Image.fromarray(wide), Image.fromarray(tall)]


def _reference_inputs(path: Path, images: list[Image.Image]) -> dict:
    processor = transformers.AutoProcessor.from_pretrained(path)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "What is in these images?"}]
    messages = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=text, images=[images] if images else None, return_tensors="pt")


def _our_prefill(model: Idefics3Model, inputs: dict) -> tuple[torch.Tensor, object]:
    ids = inputs["input_ids"][0]
    image_embeds = None
    if "pixel_values" in inputs:
        mask = inputs.get("pixel_attention_mask")
        pixels = inputs["pixel_values"][0]
        mask = torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.bool) if mask is None else mask[0].bool()
        image_embeds = model.encode_images(pixels, mask)
    cache = model.new_cache(num_slots=1, max_len=ids.shape[0] + STEPS + 1)
    hidden = model(model.embed(ids, image_embeds), cache, AttentionBatch.single(0, 0, ids.shape[0]))
    return model.logits(hidden), cache


def test_tiles_encoded_one_group_at_a_time_match_reference(
    checkpoint: tuple[Spec, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU path that sends tiles through the vision tower in groups (here one tile each) changes nothing."""
    monkeypatch.setattr(siglip, "CPU_GROUP_BYTES", 1)
    _, path = checkpoint
    reference = transformers.Idefics3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    inputs = _reference_inputs(path, _images())
    assert inputs["pixel_values"].shape[1] > 1  # several tiles, so several groups
    with torch.no_grad():
        expected = reference(**inputs).logits[0]
        logits, _ = _our_prefill(load_model(path, dtype="fp32", progress=False), inputs)
    assert (logits - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_logits_and_greedy_tokens_match_reference(checkpoint: tuple[Spec, Path], num_images: int) -> None:
    spec, path = checkpoint
    reference = transformers.Idefics3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None  # run all STEPS tokens on both sides
    inputs = _reference_inputs(path, _images()[:num_images])
    with torch.no_grad():
        ref_prefill = reference(**inputs).logits[0]
        ref = reference.generate(
            **inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    model = load_model(path, dtype="fp32", progress=False)
    with torch.no_grad():
        logits, cache = _our_prefill(model, inputs)
        assert (logits - ref_prefill).abs().max().item() <= TOL
        prompt_len = inputs["input_ids"].shape[1]
        generated = ref.sequences[0, prompt_len:]
        assert generated.numel() == STEPS
        ours = [int(logits[-1].argmax())]
        for step in range(1, STEPS):
            at = AttentionBatch.single(0, prompt_len + step - 1, 1)
            token = generated[step - 1].view(1)
            step_logits = model.logits(model(model.embed(token), cache, at))[-1]
            assert (step_logits - ref.logits[step][0]).abs().max().item() <= TOL, f"step {step}"
            ours.append(int(step_logits.argmax()))
    assert ours == generated.tolist()


@pytest.mark.skipif(not native.available(), reason="the native kernels are not built or no AVX-512")
def test_bf16_checkpoint_in_fp32_keeps_bf16_linears_and_matches_reference(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    """A bf16 checkpoint run in fp32 on the CPU keeps its text Linear weights in bf16 (the same values, half the
    bytes): the logits still match transformers' fp32 model of the same files, prefill and decode."""
    folder = tmp_path / "bf16"
    shutil.copytree(small_checkpoint, folder)
    weights = load_file(folder / "model.safetensors")
    save_file({name: t.to(torch.bfloat16) for name, t in weights.items()}, folder / "model.safetensors")
    reference = transformers.Idefics3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = _reference_inputs(folder, _images()[:1])
    with torch.no_grad():
        expected = reference(**inputs).logits[0]
        model = load_model(folder, dtype="fp32", progress=False)
        kept = [m for m in model.modules() if isinstance(m, Bf16Linear)]
        covered = sum(len(m.splits) for m in kept)  # q/k/v and gate/up merged into one layer each
        assert covered == 7 * model.config.text.num_hidden_layers + (not model.config.tie_word_embeddings)
        assert (
            model.dtype == torch.float32
            and model.model.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.float32
        )
        logits, cache = _our_prefill(model, inputs)  # prefill: more rows than the native kernel takes
        assert (logits - expected).abs().max().item() <= TOL
        prompt_len = inputs["input_ids"].shape[1]
        token = logits[-1].argmax().view(1)
        step = model.logits(model(model.embed(token), cache, AttentionBatch.single(0, prompt_len, 1)))[-1]
        ids = torch.cat([inputs["input_ids"], token.view(1, 1)], dim=1)
        mask = torch.ones_like(ids)
        full = reference(**{**inputs, "input_ids": ids, "attention_mask": mask}).logits[0, -1]
    assert (step - full).abs().max().item() <= TOL  # decode: the native bf16 kernel
