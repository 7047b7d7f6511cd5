"""KV cache storage and the attention call used by the text decoder.

The cache is one preallocated pool per layer, addressed by *slot* (one slot per sequence) and position:
K and V are [num_slots, kv_heads, max_len, head_dim]. Nothing is reallocated per token.

A forward pass works on a flat run of N new tokens from several sequences (no padding): first the
decode rows (one token each), then prefill segments (a chunk of one sequence's prompt each). Every new
token's K/V is written at (slot, position) in one indexed store; then the decode rows attend in one
batched call over a contiguous range of slots, and each prefill segment over its own slot. A step of decode
rows alone that fill their slot range and share one context length (batch-1 decode is one) writes with plain
slices instead, and its attention output is the result.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from idefix import native


class KVCache:
    """Per-layer K and V pools: [num_slots, kv_heads, max_len, head_dim] each."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | list[torch.device] = "cpu",
    ) -> None:
        """`device`: one for all layers, or one per layer (each layer's KV lives on its layer's device)."""
        shape = (num_slots, kv_heads, max_len, head_dim)
        devices = device if isinstance(device, list) else [torch.device(device)] * num_layers
        self.k = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.v = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.num_slots = num_slots
        self.max_len = max_len

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def copy(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (prefix sharing)."""
        for pool in self.k + self.v:
            pool[dst, :, :length] = pool[src, :, :length]


@dataclass(frozen=True)
class DecodeGroup:
    """`count` one-token rows, flat tokens [0, count), attended in one call over slots [lo, hi).

    rows:        [count] slot - lo of each row, strictly ascending (so count == hi - lo means every slot).
    context_len: keys read per slot (the longest row's context).
    mask:        [hi - lo, 1, 1, context_len] bool, True where a key is visible; None when every slot in
                 the range is a row that sees exactly context_len keys. Slots in the range without a row
                 see key 0 only, so their (discarded) output stays finite.
    """

    count: int
    lo: int
    hi: int
    rows: torch.Tensor
    context_len: int
    mask: torch.Tensor | None

    def to(self, device: torch.device) -> DecodeGroup:
        mask = None if self.mask is None else self.mask.to(device)
        return replace(self, rows=self.rows.to(device), mask=mask)


@dataclass(frozen=True)
class Segment:
    """`length` new tokens of one sequence at flat tokens [offset, offset + length), positions
    start .. start + length - 1 of `slot`. mask: [1, 1, length, start + length] bool when start > 0."""

    offset: int
    length: int
    slot: int
    start: int
    mask: torch.Tensor | None

    def to(self, device: torch.device) -> Segment:
        return self if self.mask is None else replace(self, mask=self.mask.to(device))


@dataclass(frozen=True)
class AttentionBatch:
    """Where a forward pass writes and reads the cache. positions, slots: [N] per new token."""

    positions: torch.Tensor
    slots: torch.Tensor
    decode: DecodeGroup | None
    segments: tuple[Segment, ...]

    def to(self, device: torch.device) -> AttentionBatch:
        """The same batch with its tensors on `device` (for layers placed on another device)."""
        if self.positions.device == device:
            return self
        return AttentionBatch(
            self.positions.to(device),
            self.slots.to(device),
            None if self.decode is None else self.decode.to(device),
            tuple(s.to(device) for s in self.segments),
        )

    def plain_decode(self) -> DecodeGroup | None:
        """The decode group when the pass is decode rows alone that fill their slot range lo..hi at one context
        length (the new tokens at context_len - 1; batch-1 decode is one), else None."""
        d = self.decode
        return d if d is not None and d.mask is None and d.count == d.hi - d.lo and not self.segments else None

    @classmethod
    def single(cls, slot: int, start: int, length: int, device: torch.device | str = "cpu") -> AttentionBatch:
        """One sequence in `slot`, writing positions start .. start+length-1 and seeing all before them."""
        positions = torch.arange(start, start + length, device=device)
        slots = torch.full((length,), slot, device=device)
        if length == 1:
            rows = torch.zeros(1, dtype=torch.long, device=device)
            return cls(positions, slots, DecodeGroup(1, slot, slot + 1, rows, start + 1, None), ())
        return cls(positions, slots, None, (segment(0, length, slot, start, device),))


def segment(offset: int, length: int, slot: int, start: int, device: torch.device | str = "cpu") -> Segment:
    """A prefill segment with its causal mask (None when it starts at position 0: plain causal attention)."""
    mask = None
    if start > 0:
        keys = torch.arange(start + length, device=device)
        queries = torch.arange(start, start + length, device=device)
        mask = (keys[None, :] <= queries[:, None])[None, None]
    return Segment(offset, length, slot, start, mask)


def write_and_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pools: tuple[torch.Tensor, torch.Tensor],
    at: AttentionBatch,
) -> torch.Tensor:
    """Store new k, v [N, Hkv, D] in the pools, then attend q [N, H, D] over each token's context -> [N, H, D]."""
    k_pool, v_pool = pools
    gqa = q.shape[1] != k.shape[1]
    d = at.plain_decode()
    if d is not None:
        # Plain slices instead of advanced indexing and one output with no copy (~20 us a layer at batch 1).
        k_pool[d.lo : d.hi, :, d.context_len - 1] = k
        v_pool[d.lo : d.hi, :, d.context_len - 1] = v
        if q.device.type == "cpu" and q.dtype == k_pool.dtype == torch.float32 and native.available():
            return native.decode_attention(q, k_pool, v_pool, d.lo, d.context_len)  # ~29 -> a few us a layer
        keys, values = k_pool[d.lo : d.hi, :, : d.context_len], v_pool[d.lo : d.hi, :, : d.context_len]
        return F.scaled_dot_product_attention(q[:, :, None], keys, values, enable_gqa=gqa)[:, :, 0]
    # Advanced indices around a slice put N first: the pools see [N, Hkv, D].
    k_pool[at.slots, :, at.positions] = k
    v_pool[at.slots, :, at.positions] = v
    out = torch.empty_like(q)
    d = at.decode
    if d is not None:
        keys, values = k_pool[d.lo : d.hi, :, : d.context_len], v_pool[d.lo : d.hi, :, : d.context_len]
        queries = q[: d.count, :, None]  # [count, H, 1, D]
        if d.count != d.hi - d.lo:
            queries = q.new_zeros(d.hi - d.lo, *queries.shape[1:]).index_copy_(0, d.rows, queries)
        attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=d.mask, enable_gqa=gqa)
        out[: d.count] = attended[d.rows, :, 0] if d.count != d.hi - d.lo else attended[:, :, 0]
    for s in at.segments:
        end = s.start + s.length
        queries = q[s.offset : s.offset + s.length].transpose(0, 1)[None]  # [1, H, T, D]
        keys, values = k_pool[s.slot : s.slot + 1, :, :end], v_pool[s.slot : s.slot + 1, :, :end]
        causal = s.mask is None and s.length > 1
        attended = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=s.mask, is_causal=causal, enable_gqa=gqa
        )
        out[s.offset : s.offset + s.length] = attended[0].transpose(0, 1)
    return out
