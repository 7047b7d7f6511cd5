"""CUDA graphs for decode-only steps.

On a GPU a decode step of these models is mostly kernel launches, not memory traffic: SmolVLM-256M ran ~21 ms a
step on an H100 (47 tok/s, `idefix bench --device cuda`) for ~0.1 ms of weights read. A CUDA graph records a
step's ~1000 kernels once and replays them with one launch. A graph fixes its tensors' addresses and shapes and
every choice the Python code made while recording, so one graph serves one key (first slot, row count, context
bucket): before a replay the step's token ids and positions are copied into the graph's input buffers, and
attention reads the bucket's keys of each slot, masked to that row's length. The rows' slots must be contiguous
(the usual case: slots are handed out from the lowest); other steps, prefill chunks among them, run eagerly.
Graphs are recorded on first use of a key, after one eager run of that step (whose result is the step's
answer), at most MAX_GRAPHS of them (the oldest dropped), all in one memory pool.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from idefix.model.attention import AttentionBatch, DecodeGroup, KVCache
from idefix.model.idefics3 import Idefics3Model

MIN_CONTEXT = 256  # the smallest context bucket; buckets double from here up to the cache's length
MAX_GRAPHS = 64


@dataclass
class _Graph:
    ids: torch.Tensor  # [rows] input buffers, refilled before each replay
    positions: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # the graph's output buffer


class DecodeGraphs:
    """Decode steps of `model` on `cache` as CUDA graphs. `record=False` runs the same static-buffer step
    eagerly (how the CPU tests check everything but the recording)."""

    def __init__(self, model: Idefics3Model, cache: KVCache, record: bool = True) -> None:
        self.model, self.cache, self.record = model, cache, record
        self.device = model.device
        self.graphs: OrderedDict[tuple[int, int, int], _Graph] = OrderedDict()
        self.pool = torch.cuda.graph_pool_handle() if record else None
        self.enabled = True  # False once a recording failed: every step eager from then on

    @staticmethod
    def supported(model: Idefics3Model, cache: KVCache) -> bool:
        """The whole model and its cache on one CUDA device (a device map runs eagerly)."""
        devices = {p.device for p in model.parameters()} | {k.device for k in cache.k}
        return len(devices) == 1 and model.device.type == "cuda"

    def bucket(self, context: int) -> int:
        return min(self.cache.max_len, max(MIN_CONTEXT, 1 << (context - 1).bit_length()))

    def logits(self, ids: list[int], positions: list[int], first_slot: int) -> torch.Tensor:
        """Logits [rows, vocab] of one decode step: row i is token ids[i] at positions[i] in slot first_slot + i."""
        key = (first_slot, len(ids), self.bucket(max(positions) + 1))
        entry = self.graphs.get(key)
        if entry is None:
            buffers = [torch.empty(len(ids), dtype=torch.long, device=self.device) for _ in range(2)]
            entry = _Graph(ids=buffers[0], positions=buffers[1])
        entry.ids.copy_(torch.tensor(ids))
        entry.positions.copy_(torch.tensor(positions))
        if entry.graph is not None:
            self.graphs.move_to_end(key)
            entry.graph.replay()
            assert entry.logits is not None
            return entry.logits.clone()
        if not self.record:
            return self._step(entry, key)
        # The first time, the step runs eagerly on a side stream (cuBLAS and cuDNN set up their workspaces on
        # first use, which a recording must not see), then is recorded; recording itself runs nothing.
        stream, current = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            logits = self._step(entry, key)
        current.wait_stream(stream)
        logits.record_stream(current)
        try:
            self._record(entry, key)
        except RuntimeError as error:  # an op that cannot be recorded: the answer above stands, the rest is eager
            logging.getLogger("idefix").warning(
                "CUDA graphs off for this engine: recording a decode step failed: %s", error
            )
            self.enabled = False
        return logits

    def _step(self, entry: _Graph, key: tuple[int, int, int]) -> torch.Tensor:
        """The step on the entry's buffers, built only from tensors and the key (so that it can be recorded)."""
        first_slot, rows, context = key
        keys = torch.arange(context, device=self.device)
        visible = (keys[None, :] <= entry.positions[:, None])[:, None, None]  # [rows, 1, 1, context]
        row_index = torch.arange(rows, device=self.device)
        decode = DecodeGroup(rows, first_slot, first_slot + rows, row_index, context, visible)
        at = AttentionBatch(entry.positions, row_index + first_slot, decode, ())
        return self.model.logits(self.model(self.model.embed(entry.ids), self.cache, at))

    def _record(self, entry: _Graph, key: tuple[int, int, int]) -> None:
        if len(self.graphs) >= MAX_GRAPHS:
            self.graphs.popitem(last=False)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            entry.logits = self._step(entry, key)
        entry.graph = graph
        self.graphs[key] = entry
