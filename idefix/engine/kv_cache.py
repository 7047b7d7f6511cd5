"""Slot bookkeeping and prefix caching for the KV pool (pure Python: no tensors here).

Each running sequence owns one slot of the pool (see `idefix.model.attention.KVCache`) holding its whole
context, so a sequence never runs out of cache mid-answer and needs no preemption. When a sequence
finishes, its slot keeps the KV as a *cached prefix* (LRU) until the slot is needed again. A new
sequence takes over the cached slot that shares its longest prefix in place (turn 2 of a chat: zero
copies, only the new tokens are prefilled), or copies the shared prefix from a slot that is still in use
(n > 1 choices, identical system prompts).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class KeySource(Protocol):
    def valid_keys(self) -> list[Any]:
        """Prefix keys of the positions whose KV is valid in the sequence's slot."""
        ...


@dataclass(frozen=True)
class SlotGrant:
    """slot: where the sequence lives; reused: prompt positions already valid there (after the copy);
    copy_from: a slot to copy the first `reused` positions from before the forward pass, or None."""

    slot: int
    reused: int
    copy_from: int | None


def common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class SlotPool:
    def __init__(self, num_slots: int, enable_prefix_caching: bool = True) -> None:
        self.num_slots = num_slots
        self.enable_prefix_caching = enable_prefix_caching
        self.free: list[int] = list(range(num_slots - 1, -1, -1))  # pop() hands out low slots first
        self.cached: OrderedDict[int, list[Any]] = OrderedDict()  # slot -> keys of its valid KV, LRU first
        self.running: dict[int, KeySource] = {}  # slot -> the sequence using it

    @property
    def num_running(self) -> int:
        return len(self.running)

    def can_acquire(self) -> bool:
        return bool(self.free or self.cached)

    def acquire(self, keys: list[Any], owner: KeySource) -> SlotGrant | None:
        """A slot for `owner`, a sequence whose prompt has `keys`; None when every slot is running."""
        if not self.can_acquire():
            return None
        limit = len(keys) - 1  # the last prompt token is always computed: its logits pick the first token
        best_slot, best_len, best_running = None, 0, False
        if self.enable_prefix_caching:
            running = ((slot, seq.valid_keys()) for slot, seq in self.running.items())
            for slot, cached_keys in [*self.cached.items(), *running]:
                length = min(common_prefix(keys, cached_keys), limit)
                if length > best_len:
                    best_slot, best_len, best_running = slot, length, slot in self.running
        if best_slot is not None and not best_running:
            del self.cached[best_slot]
            self.running[best_slot] = owner
            return SlotGrant(best_slot, best_len, None)
        slot = self.free.pop() if self.free else self.cached.popitem(last=False)[0]
        self.running[slot] = owner
        if best_slot is None:
            return SlotGrant(slot, 0, None)
        return SlotGrant(slot, best_len, best_slot)

    def release(self, slot: int, keep: bool = True) -> None:
        """A sequence is done with `slot`: keep its KV as a cached prefix, or free it."""
        keys = self.running.pop(slot).valid_keys()
        if keep and self.enable_prefix_caching and keys:
            self.cached[slot] = keys
        else:
            self.free.append(slot)

    def clear_cache(self) -> None:
        while self.cached:
            self.free.append(self.cached.popitem(last=False)[0])
