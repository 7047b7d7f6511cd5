"""The only place that builds tensors: turns a StepPlan into one forward pass and sampled tokens."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from idefix.engine.graphs import DecodeGraphs
from idefix.engine.image_cache import ImageFeatureCache
from idefix.engine.sampler import SamplerOutput, SamplingBatch, sample
from idefix.engine.scheduler import StepPlan
from idefix.model.attention import AttentionBatch, DecodeGroup, KVCache, Segment, segment
from idefix.model.idefics3 import Idefics3Model
from idefix.request import Sequence


class ModelRunner:
    def __init__(
        self,
        model: Idefics3Model,
        cache: KVCache,
        image_cache: ImageFeatureCache,
        eos_ids: frozenset[int],
        graphs: DecodeGraphs | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.image_cache = image_cache
        self.eos_ids = eos_ids
        self.graphs = graphs  # decode-only steps over contiguous slots replay CUDA graphs
        self.device = model.device

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> tuple[list[Sequence], SamplerOutput | None]:
        """Run the plan; return the sequences that get a new token (decodes, then completed prompts)."""
        for src, dst, length in plan.copies:
            self.cache.copy(src, dst, length)
        decodes = sorted(plan.decodes, key=_slot)  # DecodeGroup rows ascend with the slot
        ids: list[int] = [seq.output_ids[-1] for seq in decodes]
        positions: list[int] = [seq.total_len - 1 for seq in decodes]
        slots: list[int] = [_slot(seq) for seq in decodes]
        graphs = self.graphs if self.graphs is not None and self.graphs.enabled else None
        if graphs is not None and decodes and not plan.prefills and slots[-1] - slots[0] == len(slots) - 1:
            logits = graphs.logits(ids, positions, slots[0])
            return decodes, sample(logits, self._sampling_batch(decodes, logits.shape[-1]))
        image_rows: list[torch.Tensor] = []
        image_mask: list[bool] = [False] * len(ids)
        segments: list[Segment] = []
        for chunk in plan.prefills:
            seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.length
            prompt = seq.prompt.token_ids[start:end]
            is_image = [token == seq.prompt.image_token_id for token in prompt]
            if any(is_image):
                before = sum(1 for token in seq.prompt.token_ids[:start] if token == seq.prompt.image_token_id)
                image_rows.append(self._image_features(seq)[before : before + sum(is_image)])
            segments.append(segment(len(ids), chunk.length, _slot(seq), start, self.device))
            ids += prompt
            image_mask += is_image
            positions += range(start, end)
            slots += [_slot(seq)] * chunk.length
        at = AttentionBatch(
            positions=torch.tensor(positions, device=self.device),
            slots=torch.tensor(slots, device=self.device),
            decode=self._decode_group(decodes),
            segments=tuple(segments),
        )
        input_ids = torch.tensor(ids, device=self.device)
        mask = torch.tensor(image_mask, device=self.device) if image_rows else None
        embeds = self.model.embed(input_ids, torch.cat(image_rows) if image_rows else None, mask)
        hidden = self.model(embeds, self.cache, at)
        rows = list(range(len(decodes)))
        sampled = list(decodes)
        for chunk, seg in zip(plan.prefills, segments, strict=True):
            if chunk.completes:
                rows.append(seg.offset + seg.length - 1)
                sampled.append(chunk.seq)
        if not sampled:
            return [], None
        logits = self.model.logits(hidden[rows])
        return sampled, sample(logits, self._sampling_batch(sampled, logits.shape[-1]))

    def _decode_group(self, decodes: Seq[Sequence]) -> DecodeGroup | None:
        if not decodes:
            return None
        slots = [_slot(seq) for seq in decodes]
        lo, hi = min(slots), max(slots) + 1
        lengths = [seq.total_len for seq in decodes]
        context = max(lengths)
        rows = torch.tensor([slot - lo for slot in slots], device=self.device)
        mask = None
        if hi - lo != len(decodes) or min(lengths) != context:
            per_slot = torch.ones(hi - lo, dtype=torch.long, device=self.device)  # non-row slots see key 0
            per_slot[rows] = torch.tensor(lengths, device=self.device)
            mask = (torch.arange(context, device=self.device)[None, :] < per_slot[:, None])[:, None, None]
        return DecodeGroup(len(decodes), lo, hi, rows, context, mask)

    def _image_features(self, seq: Sequence) -> torch.Tensor:
        """[image tokens of the prompt, hidden]: every image's features, encoded once per content."""
        images = seq.prompt.images
        assert images is not None
        parts, first = [], 0
        for digest, tiles in zip(seq.prompt.image_digests, images.tiles_per_image, strict=True):
            features = self.image_cache.get(digest)
            if features is None:
                pixels = images.pixel_values[first : first + tiles].to(self.device)
                mask = images.pixel_attention_mask[first : first + tiles].to(self.device)
                features = self.model.encode_images(pixels, mask).reshape(-1, self.model.config.text.hidden_size)
                self.image_cache.put(digest, features)
            parts.append(features)
            first += tiles
        return torch.cat(parts)

    def _sampling_batch(self, seqs: list[Sequence], vocab_size: int) -> SamplingBatch:
        return SamplingBatch.build(
            params=[seq.params for seq in seqs],
            prompt_ids=[seq.prompt.token_ids for seq in seqs],
            output_ids=[seq.output_ids for seq in seqs],
            generators=[seq.generator for seq in seqs],
            eos_ids=self.eos_ids,
            vocab_size=vocab_size,
            device=self.device,
        )


def _slot(seq: Sequence) -> int:
    assert seq.slot is not None, "a scheduled sequence holds a slot"
    return seq.slot
