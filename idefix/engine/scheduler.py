"""Which sequences run in the next step, and how many tokens each (pure Python, no tensors).

Every running sequence that has finished its prompt decodes one token per step. Prompts are prefilled in
chunks so that the new tokens of a step stay within `max_num_batched_tokens` (decode tokens first), and
waiting sequences are admitted first come, first served while a slot and token budget remain.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from idefix.config import EngineConfig
from idefix.engine.kv_cache import SlotPool
from idefix.errors import OverloadedError
from idefix.request import Sequence, Status


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt positions [start, start + length) of `seq`; `completes` when they reach the prompt's end."""

    seq: Sequence
    start: int
    length: int

    @property
    def completes(self) -> bool:
        return self.start + self.length == self.seq.prompt_len


@dataclass(frozen=True)
class StepPlan:
    """decodes: sequences feeding their last sampled token; prefills: prompt chunks; copies: KV prefix
    copies (src_slot, dst_slot, length) to run before the forward pass."""

    decodes: list[Sequence]
    prefills: list[PrefillChunk]
    copies: list[tuple[int, int, int]]

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(chunk.length for chunk in self.prefills)


class Scheduler:
    def __init__(self, config: EngineConfig, pool: SlotPool) -> None:
        self.config = config
        self.pool = pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seqs: list[Sequence]) -> None:
        """Queue the sequences of one request; OverloadedError when the waiting queue is full."""
        free_running = self.config.max_num_seqs - len(self.running)
        if len(self.waiting) + len(seqs) > self.config.max_waiting + max(free_running, 0):
            raise OverloadedError(
                f"the server is busy: {len(self.waiting)} requests are waiting (limit {self.config.max_waiting})"
            )
        self.waiting.extend(seqs)

    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens
        decodes = [seq for seq in self.running if not seq.in_prefill]
        budget -= len(decodes)
        prefills: list[PrefillChunk] = []
        for seq in self.running:
            if seq.in_prefill and budget > 0:
                chunk = PrefillChunk(seq, seq.num_computed, min(seq.prompt_len - seq.num_computed, budget))
                prefills.append(chunk)
                budget -= chunk.length
        copies: list[tuple[int, int, int]] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.leader is not None and seq.leader.status is Status.RUNNING and seq.leader.in_prefill:
                break  # a sibling choice copies its leader's prompt KV once that is computed
            grant = self.pool.acquire(seq.keys, seq)
            if grant is None:
                break
            self.waiting.popleft()
            seq.status, seq.slot, seq.num_computed = Status.RUNNING, grant.slot, grant.reused
            if seq.leader is None:  # choices 1..n-1 copy their leader's prompt: not a cache hit
                seq.usage.cached_prompt_tokens = grant.reused
            if grant.copy_from is not None:
                copies.append((grant.copy_from, grant.slot, grant.reused))
            self.running.append(seq)
            chunk = PrefillChunk(seq, seq.num_computed, min(seq.prompt_len - seq.num_computed, budget))
            prefills.append(chunk)
            budget -= chunk.length
        return StepPlan(decodes, prefills, copies)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take `seq` out of the queues; its slot's KV stays as a cached prefix."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
            assert seq.slot is not None
            self.pool.release(seq.slot)
            seq.slot = None
        seq.status, seq.finish_reason = Status.FINISHED, reason
