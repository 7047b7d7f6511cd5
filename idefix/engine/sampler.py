"""The sampler: one pure batched function from logits [B, V] to the next token of each row.

The runner builds a `SamplingBatch` once per step (`SamplingBatch.build`) and calls `sample(logits, batch)`.
Order of operations, as in vLLM v1 and transformers' `generate`:

1. `logit_bias` is added, then `banned` ids (EOS and stop ids while `min_tokens` is not reached) are set to -inf.
2. Repetition penalty (CTRL / transformers) on tokens in the prompt or the output:
   logit / p if logit > 0 else logit * p.
3. Frequency and presence penalties (OpenAI), over generated tokens only:
   logit -= count * frequency_penalty + (count > 0) * presence_penalty.
4. Temperature: logits / T (greedy rows use T = 1).
   Log-probabilities are `log_softmax` of the logits at this point, i.e. after penalties and temperature and
   before the truncations below, so the alternatives in `top_logprobs` are never -inf from truncation.
5. Greedy rows (temperature < 1e-5 or top_k 1) take the argmax here.
6. Truncation for the other rows, each step on the distribution left by the previous one (set to -inf):
   top_k keeps logits >= the k-th largest (ties with the k-th are all kept, as in transformers);
   top_p drops a token when the mass of it and all tokens below it in ascending order is <= 1 - p
   (transformers' rule; the top token always stays), and ties with the smallest kept logit are kept too,
   so the result does not depend on how the sort orders equal logits;
   min_p keeps tokens with probability >= min_p * the top probability.
7. Sampling by exponential race: token = argmax(probs / q) with q ~ Exp(1), which draws from probs.
   A row with a seed fills its own row of q from its own `torch.Generator`, so its token depends only on its
   logits and its generator state, whatever the other rows of the batch are; other rows share the default
   generator.

All-greedy batches without penalties or bias skip softmax entirely (step 5 on the raw logits).
No `.item()` or other host sync: the only Python loop is over the seeded rows (one RNG call each).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from idefix.sampling import SamplingParams


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A request's own generator for `SamplingBatch.build`; None (the default generator) without a seed."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


@dataclass(frozen=True, eq=False)
class SamplingBatch:
    """Per-row sampling tensors for the B rows of one step; None / False flags let `sample` skip whole stages."""

    temperature: torch.Tensor
    """[B] float32; 1.0 for greedy rows, so logprobs of greedy rows are those of the penalised logits."""
    greedy: torch.Tensor
    """[B] bool; the row takes the argmax."""
    top_k: torch.Tensor | None
    """[B] long, V where off; None when no sampled row uses top_k."""
    top_p: torch.Tensor | None
    """[B] float32, 1.0 where off; None when no sampled row uses top_p."""
    min_p: torch.Tensor | None
    """[B] float32, 0.0 where off; None when no sampled row uses min_p."""
    repetition_penalty: torch.Tensor
    """[B, 1] float32 (1.0 = off)."""
    frequency_penalty: torch.Tensor
    """[B, 1] float32."""
    presence_penalty: torch.Tensor
    """[B, 1] float32."""
    output_counts: torch.Tensor | None
    """[B, V] float32, how often each token was generated; None when no row has any penalty."""
    prompt_presence: torch.Tensor | None
    """[B, V] bool, token occurs in the prompt; None when no row has a repetition penalty."""
    logit_bias: torch.Tensor | None
    """[B, V] float32 added to the logits; None when no row has a bias."""
    banned: torch.Tensor | None
    """[B, V] bool, ids set to -inf (EOS / stop ids before min_tokens); None when nothing is banned."""
    generators: tuple[torch.Generator | None, ...]
    """Per row: its own generator (seeded request) or None (default generator, and always for greedy rows)."""
    all_greedy: bool
    """Every row is greedy: no random numbers are drawn."""
    max_top_logprobs: int
    """Largest `top_logprobs` over rows that want logprobs; -1 when no row wants logprobs."""

    @property
    def needs_processing(self) -> bool:
        """Whether any stage before the argmax changes the logits."""
        return self.output_counts is not None or self.logit_bias is not None or self.banned is not None

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
        eos_ids: Collection[int],
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingBatch:
        """Tensors for one step; row i is request i with its prompt and generated ids so far."""
        if not len(params) == len(prompt_ids) == len(output_ids) == len(generators):
            raise ValueError("params, prompt_ids, output_ids and generators must have one entry per row")
        greedy = [p.greedy for p in params]
        sampled = [p for p, g in zip(params, greedy, strict=True) if not g]

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        has_rep = any(p.repetition_penalty != 1.0 for p in params)
        has_pen = has_rep or any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params)
        banned_ids = [_banned_ids(p, len(out), eos_ids) for p, out in zip(params, output_ids, strict=True)]
        shape = (len(params), vocab_size)
        return cls(
            temperature=column([1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)]),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            top_k=(
                torch.tensor([_top_k(p, vocab_size) for p in params], dtype=torch.long, device=device)
                if any(_top_k(p, vocab_size) < vocab_size for p in sampled)
                else None
            ),
            top_p=column([p.top_p for p in params]) if any(p.top_p < 1.0 for p in sampled) else None,
            min_p=column([p.min_p for p in params]) if any(p.min_p > 0.0 for p in sampled) else None,
            repetition_penalty=column([p.repetition_penalty for p in params])[:, None],
            frequency_penalty=column([p.frequency_penalty for p in params])[:, None],
            presence_penalty=column([p.presence_penalty for p in params])[:, None],
            output_counts=_scatter(shape, output_ids, torch.float32, device, accumulate=True) if has_pen else None,
            prompt_presence=_scatter(shape, prompt_ids, torch.bool, device) if has_rep else None,
            logit_bias=_bias(params, shape, device),
            banned=_scatter(shape, banned_ids, torch.bool, device) if any(banned_ids) else None,
            generators=tuple(None if g else gen for g, gen in zip(greedy, generators, strict=True)),
            all_greedy=all(greedy),
            max_top_logprobs=max((p.top_logprobs for p in params if p.logprobs), default=-1),
        )


@dataclass(frozen=True, eq=False)
class SamplerOutput:
    """What `sample` returns for the B rows of one step."""

    token_ids: torch.Tensor
    """[B] long, the chosen tokens."""
    logprobs: torch.Tensor | None
    """[B] float32, log-probability of the chosen token; None when no row asked for logprobs."""
    top_ids: torch.Tensor | None
    """[B, K] long, K = `max_top_logprobs`, most likely first; None when K <= 0. Rows that asked for fewer
    take a prefix; among equal logprobs the order is unspecified."""
    top_logprobs: torch.Tensor | None
    """[B, K] float32, the log-probabilities of `top_ids`, descending."""


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """Choose the next token of each row of `logits` [B, V]; the input is not modified."""
    logits = logits.float()
    if batch.all_greedy and not batch.needs_processing:
        token_ids = logits.argmax(dim=-1)
        return _with_logprobs(token_ids, logits, batch)
    logits = apply_penalties(logits, batch)
    logits = logits / batch.temperature[:, None]
    if batch.all_greedy:
        return _with_logprobs(logits.argmax(dim=-1), logits, batch)
    probs = truncate(logits, batch).softmax(dim=-1)
    token_ids = _exponential_race(probs, batch.generators)
    token_ids = torch.where(batch.greedy, logits.argmax(dim=-1), token_ids)
    return _with_logprobs(token_ids, logits, batch)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Steps 1-3: bias, banned ids, repetition / frequency / presence penalties; returns a new tensor."""
    if batch.logit_bias is not None:
        logits = logits + batch.logit_bias
    if batch.banned is not None:
        logits = logits.masked_fill(batch.banned, -torch.inf)
    counts = batch.output_counts
    if counts is None:
        return logits
    if batch.prompt_presence is not None:
        present = batch.prompt_presence | (counts > 0)
        rep = batch.repetition_penalty
        logits = torch.where(present, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - counts * batch.frequency_penalty - (counts > 0).float() * batch.presence_penalty


def truncate(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Step 6: top_k, then top_p, then min_p; dropped tokens become -inf; returns a new tensor."""
    if batch.top_k is not None or batch.top_p is not None:
        ordered = logits.sort(dim=-1).values  # [B, V] ascending, as transformers' top_p
        if batch.top_k is not None:
            kth = ordered.gather(-1, (logits.shape[-1] - batch.top_k)[:, None])  # [B, 1] k-th largest
            logits = logits.masked_fill(logits < kth, -torch.inf)
            ordered = ordered.masked_fill(ordered < kth, -torch.inf)
        if batch.top_p is not None:
            mass_upto = ordered.softmax(dim=-1).cumsum(dim=-1)  # [B, V] mass of this token and all below it
            dropped = (mass_upto <= 1 - batch.top_p[:, None]).sum(dim=-1, keepdim=True)
            smallest_kept = ordered.gather(-1, dropped.clamp_max(logits.shape[-1] - 1))  # the top token stays
            logits = logits.masked_fill(logits < smallest_kept, -torch.inf)
    if batch.min_p is not None:
        probs = logits.softmax(dim=-1)
        floor = batch.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < floor, -torch.inf)
    return logits


def _exponential_race(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """argmax(probs / q), q ~ Exp(1) per element: a draw from each row of probs [B, V]."""
    q = torch.empty_like(probs)
    if any(g is None for g in generators):
        q.exponential_()
    for row, g in enumerate(generators):
        if g is not None:
            q[row].exponential_(generator=g)
    # A zero draw would turn a masked token's 0 / 0 into NaN, which argmax prefers.
    q.clamp_min_(torch.finfo(q.dtype).tiny)
    return (probs / q).argmax(dim=-1)


def _with_logprobs(token_ids: torch.Tensor, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    if batch.max_top_logprobs < 0:
        return SamplerOutput(token_ids, None, None, None)
    logprobs = logits.log_softmax(dim=-1)
    chosen = logprobs.gather(-1, token_ids[:, None])[:, 0]
    if batch.max_top_logprobs == 0:
        return SamplerOutput(token_ids, chosen, None, None)
    top = logprobs.topk(batch.max_top_logprobs, dim=-1)
    return SamplerOutput(token_ids, chosen, top.indices, top.values)


def _bias(params: Sequence[SamplingParams], shape: tuple[int, int], device: torch.device | str) -> torch.Tensor | None:
    if not any(p.logit_bias for p in params):
        return None
    values = [v for p in params for v in p.logit_bias.values()]
    return _scatter(shape, [list(p.logit_bias) for p in params], torch.float32, device, values=values)


def _top_k(params: SamplingParams, vocab_size: int) -> int:
    return vocab_size if params.top_k <= 0 else min(params.top_k, vocab_size)


def _banned_ids(params: SamplingParams, generated: int, eos_ids: Collection[int]) -> list[int]:
    if generated >= params.min_tokens:
        return []
    return list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_ids))


def _scatter(
    shape: tuple[int, int],
    ids: Sequence[Sequence[int]],
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    accumulate: bool = False,
    values: Sequence[float] | None = None,
) -> torch.Tensor:
    """A [B, V] tensor with row i set at ids[i]: 1 / True, the count of each id (`accumulate`), or `values`."""
    rows = [row for row, row_ids in enumerate(ids) for _ in row_ids]
    cols = [token for row_ids in ids for token in row_ids]
    out = torch.zeros(shape, dtype=dtype, device=device)
    index = (torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(cols, dtype=torch.long, device=device))
    src = (
        torch.tensor(values, dtype=dtype, device=device)
        if values is not None
        else torch.ones(len(cols), dtype=dtype, device=device)
    )
    return out.index_put_(index, src, accumulate=accumulate)
