"""KV cache storage and the attention call used by the text decoder.

The cache is one preallocated pool per layer, addressed by *slot* (one slot per running sequence) and
position: K and V are [num_slots, kv_heads, max_len, head_dim]. Nothing is reallocated per token; the
engine assigns slots, the model writes new K/V at the given positions and attends over the first
`context_len` positions of each row's slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_slots, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.max_len = max_len

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass(frozen=True)
class AttentionBatch:
    """Where a forward pass reads and writes the cache; built by whoever drives the model.

    positions:   [B, T] absolute position of each new token in its sequence (rope angle and cache row).
    slots:       [B] cache slot of each row.
    context_len: number of cache positions attended to (the longest row's length after this step).
    mask:        [B, 1, T, context_len] bool, True where a query may attend; None means plain causal
                 attention over a batch whose rows all start at position 0 and have equal length, or a
                 single decode row that sees its whole context.
    slot_range:  (start, stop) when `slots` are consecutive, so the cache is read as a view, not a copy.
    """

    positions: torch.Tensor
    slots: torch.Tensor
    context_len: int
    mask: torch.Tensor | None
    slot_range: tuple[int, int] | None

    @classmethod
    def single(cls, slot: int, start: int, length: int, device: torch.device | str = "cpu") -> AttentionBatch:
        """One sequence in `slot`, writing positions start .. start+length-1 and seeing all before them."""
        positions = torch.arange(start, start + length, device=device)[None]
        mask = None
        if start > 0 and length > 1:
            keys = torch.arange(start + length, device=device)
            mask = (keys[None, :] <= positions[0, :, None])[None, None]
        slots = torch.tensor([slot], device=device)
        return cls(positions, slots, start + length, mask, (slot, slot + 1))


def write_and_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, at: AttentionBatch
) -> torch.Tensor:
    """Store the new k, v [B, Hkv, T, D] in the pools, then attend q [B, H, T, D] over the cached context."""
    rows = at.slots[:, None].expand_as(at.positions)
    # Advanced indices around a slice put [B, T] first: the pools see [B, T, Hkv, D].
    k_pool[rows, :, at.positions] = k.transpose(1, 2)
    v_pool[rows, :, at.positions] = v.transpose(1, 2)
    if at.slot_range is not None:
        start, stop = at.slot_range
        keys, values = k_pool[start:stop, :, : at.context_len], v_pool[start:stop, :, : at.context_len]
    else:
        keys, values = k_pool[at.slots, :, : at.context_len], v_pool[at.slots, :, : at.context_len]
    is_causal = at.mask is None and q.shape[2] > 1
    return F.scaled_dot_product_attention(
        q, keys, values, attn_mask=at.mask, is_causal=is_causal, enable_gqa=q.shape[1] != keys.shape[1]
    )
