"""The batched sampler on fixed logits, against per-row reference implementations and transformers."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from transformers import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from idefix.engine.sampler import SamplingBatch, apply_penalties, make_generator, sample, truncate
from idefix.sampling import SamplingParams

V = 12
EOS = (11,)
NEG = float("-inf")


def batch_of(
    params: Sequence[SamplingParams],
    prompts: Sequence[Sequence[int]] | None = None,
    outputs: Sequence[Sequence[int]] | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
    vocab_size: int = V,
) -> SamplingBatch:
    n = len(params)
    return SamplingBatch.build(
        params,
        prompts if prompts is not None else [[]] * n,
        outputs if outputs is not None else [[]] * n,
        generators if generators is not None else [make_generator(p.seed, "cpu") for p in params],
        EOS,
        vocab_size,
        "cpu",
    )


def fixed_logits(rows: int, vocab: int = V, seed: int = 0) -> torch.Tensor:
    """Distinct values (no ties), both signs."""
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


# ---- reference implementations, one row at a time -------------------------------------------------------


def ref_top_k(row: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0:
        return row.clone()
    kth = sorted(row.tolist(), reverse=True)[k - 1]
    return torch.tensor([x if x >= kth else NEG for x in row.tolist()])


def ref_top_p(row: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens until their mass reaches p (the top token always), plus ties of the last."""
    probs = row.double().softmax(-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = [], 0.0
    for i in order:
        if kept and mass >= p:
            break
        kept.append(i)
        mass += probs[i]
    floor = min(row[i].item() for i in kept)
    return torch.tensor([x if x >= floor else NEG for x in row.tolist()])


def ref_min_p(row: torch.Tensor, min_p: float) -> torch.Tensor:
    probs = row.double().softmax(-1)
    return torch.where(probs >= min_p * probs.max(), row, torch.tensor(NEG))


def ref_penalties(row: list[float], prompt: list[int], output: list[int], p: SamplingParams) -> list[float]:
    out = list(row)
    for t, bias in p.logit_bias.items():
        out[t] += bias
    for t in set(prompt) | set(output):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(output):
        out[t] -= output.count(t) * p.frequency_penalty + p.presence_penalty
    return out


# ---- truncation masks --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ks", [(1, 3, 0, -1), (V, 5, 2, 12)])
def test_top_k_mask_matches_reference_and_transformers(ks: tuple[int, ...]) -> None:
    logits = fixed_logits(len(ks))
    params = [SamplingParams(temperature=1.0, top_k=k) for k in ks]
    got = truncate(logits, batch_of(params))
    for row, k in enumerate(ks):
        torch.testing.assert_close(got[row], ref_top_k(logits[row], k))
        if k > 0:
            oracle = TopKLogitsWarper(k)(torch.zeros(1, 1, dtype=torch.long), logits[row : row + 1])
            torch.testing.assert_close(got[row], oracle[0])


def test_top_k_keeps_every_tie_with_the_kth() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0] + [-1.0] * (V - 6)])
    got = truncate(logits, batch_of([SamplingParams(top_k=2)]))
    assert torch.isfinite(got[0]).tolist()[:6] == [True, False, True, True, True, False]


@pytest.mark.parametrize("ps", [(0.3, 0.75, 0.9, 1.0), (0.05, 0.5, 0.999, 0.6)])
def test_top_p_mask_matches_reference_and_transformers(ps: tuple[float, ...]) -> None:
    logits = fixed_logits(len(ps), seed=1)
    got = truncate(logits, batch_of([SamplingParams(top_p=p) for p in ps]))
    for row, p in enumerate(ps):
        torch.testing.assert_close(got[row], ref_top_p(logits[row], p))
        oracle = TopPLogitsWarper(p)(torch.zeros(1, 1, dtype=torch.long), logits[row : row + 1].clone())
        torch.testing.assert_close(got[row], oracle[0])


def test_top_p_keeps_ties_with_the_smallest_kept_token() -> None:
    # probs ~ [0.47, 0.17, 0.17, 0.17, 0.02]; p = 0.6 is reached inside the tie: all three tied tokens stay.
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, -1.0] + [-9.0] * (V - 5)])
    got = truncate(logits, batch_of([SamplingParams(top_p=0.6)]))
    assert torch.isfinite(got[0]).tolist()[:5] == [True, True, True, True, False]


def test_min_p_mask_matches_reference_and_transformers() -> None:
    mins = (0.0, 0.05, 0.3, 1.0)
    logits = fixed_logits(len(mins), seed=2)
    got = truncate(logits, batch_of([SamplingParams(min_p=m) for m in mins]))
    for row, m in enumerate(mins):
        torch.testing.assert_close(got[row], ref_min_p(logits[row], m))
        if m > 0:
            oracle = MinPLogitsWarper(m)(torch.zeros(1, 1, dtype=torch.long), logits[row : row + 1].clone())
            torch.testing.assert_close(got[row], oracle[0])


def test_top_k_then_top_p_then_min_p_compose_in_order() -> None:
    logits = fixed_logits(1, seed=3)
    p = SamplingParams(top_k=6, top_p=0.8, min_p=0.2)
    expected = ref_min_p(ref_top_p(ref_top_k(logits[0], 6), 0.8), 0.2)
    torch.testing.assert_close(truncate(logits, batch_of([p]))[0], expected.float())


# ---- penalties, bias, banned ids ---------------------------------------------------------------------------


def test_penalties_match_direct_formulas_per_row() -> None:
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(frequency_penalty=0.7, presence_penalty=-0.4),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-1.5, presence_penalty=2.0, logit_bias={3: 5.0}),
        SamplingParams(),
    ]
    prompts = [[0, 1, 2], [4, 4, 5], [1, 7], [0, 1]]
    outputs = [[3, 3, 9], [5, 5, 5, 6], [7, 7, 8, 2], [1, 2, 3]]
    logits = fixed_logits(4, seed=4)
    got = apply_penalties(logits, batch_of(params, prompts, outputs))
    for row, p in enumerate(params):
        expected = ref_penalties(logits[row].tolist(), prompts[row], outputs[row], p)
        torch.testing.assert_close(got[row], torch.tensor(expected))
    torch.testing.assert_close(got[3], logits[3])  # a row without penalties is untouched


def test_repetition_penalty_matches_transformers() -> None:
    prompt, output = [0, 2, 5], [5, 7, 7, 1]
    logits = fixed_logits(1, seed=5)
    got = apply_penalties(logits, batch_of([SamplingParams(repetition_penalty=1.7)], [prompt], [output]))
    oracle = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(got, oracle)


def test_frequency_and_presence_ignore_the_prompt() -> None:
    logits = fixed_logits(1, seed=6)
    p = SamplingParams(frequency_penalty=1.0, presence_penalty=1.0)
    got = apply_penalties(logits, batch_of([p], [[0, 1, 2, 3]], [[4, 4]]))
    expected = logits.clone()
    expected[0, 4] -= 2 * 1.0 + 1.0
    torch.testing.assert_close(got, expected)


def test_logit_bias_is_added_and_can_force_a_token() -> None:
    logits = fixed_logits(2, seed=7)
    params = [SamplingParams(temperature=0, logit_bias={5: 100.0, 0: -3.5}), SamplingParams(temperature=0)]
    batch = batch_of(params)
    processed = apply_penalties(logits, batch)
    assert processed[0, 0] == logits[0, 0] - 3.5 and processed[0, 5] == logits[0, 5] + 100
    torch.testing.assert_close(processed[1], logits[1])
    assert sample(logits, batch).token_ids.tolist() == [5, logits[1].argmax().item()]


def test_min_tokens_bans_eos_and_stop_ids_until_reached() -> None:
    logits = torch.zeros(4, V)
    logits[:, EOS[0]] = 50.0
    logits[:, 4] = 49.0
    logits[:, 2] = 48.0
    params = [
        SamplingParams(temperature=0, min_tokens=3, stop_token_ids=(4,)),  # 2 generated: banned
        SamplingParams(temperature=0, min_tokens=3, stop_token_ids=(4,)),  # 3 generated: free
        SamplingParams(temperature=0, min_tokens=3, ignore_eos=True),  # EOS is not a stop: not banned
        SamplingParams(temperature=0),
    ]
    batch = batch_of(params, outputs=[[0, 0], [0, 0, 0], [0], [0]])
    assert batch.banned is not None and batch.banned.sum().item() == 2
    assert sample(logits, batch).token_ids.tolist() == [2, EOS[0], EOS[0], EOS[0]]


def test_unused_stages_are_none() -> None:
    batch = batch_of([SamplingParams(), SamplingParams(temperature=0, top_k=5, top_p=0.5)], [[1], [2]], [[3], [4]])
    assert batch.output_counts is None and batch.prompt_presence is None
    assert batch.logit_bias is None and batch.banned is None
    assert batch.top_k is None and batch.top_p is None and batch.min_p is None  # greedy rows never truncate
    assert batch.max_top_logprobs == -1 and not batch.all_greedy
    assert batch_of([SamplingParams(presence_penalty=0.1)]).prompt_presence is None


# ---- sampling ---------------------------------------------------------------------------------------------


def seeded_run(row_params: SamplingParams, others: Sequence[SamplingParams], index: int, steps: int = 50) -> list[int]:
    """Tokens of one seeded row over `steps` steps, placed at `index` among `others`."""
    params = list(others[:index]) + [row_params] + list(others[index:])
    gens = [make_generator(p.seed, "cpu") for p in params]
    tokens = []
    for step in range(steps):
        logits = torch.randn(len(params), V, generator=torch.Generator().manual_seed(1000 + step))
        logits[index] = fixed_logits(1, seed=step)[0] / 3  # the row's own logits depend on the step only
        out = sample(logits, batch_of(params, generators=gens))
        tokens.append(int(out.token_ids[index]))
    return tokens


def test_seed_reproducible_whatever_the_batch() -> None:
    row = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    alone = seeded_run(row, [], 0)
    assert len(set(alone)) > 3  # the row really samples
    assert seeded_run(row, [], 0) == alone
    assert seeded_run(row, [SamplingParams(seed=7), SamplingParams(temperature=0)], 1) == alone
    others = [SamplingParams(), SamplingParams(seed=1234), SamplingParams(top_k=3), SamplingParams(min_p=0.1)]
    assert seeded_run(row, others, 4) == alone
    assert seeded_run(SamplingParams(temperature=1.0, top_p=0.95, seed=99), [], 0) != alone


def test_samples_follow_the_processed_distribution() -> None:
    torch.manual_seed(0)
    row = torch.tensor([1.0, 0.0, -1.0, 2.0] + [-30.0] * (V - 4))
    params = [SamplingParams(temperature=0.5, top_k=3)] * 20000
    counts = torch.bincount(sample(row.repeat(20000, 1), batch_of(params)).token_ids, minlength=V)
    expected = ref_top_k(row / 0.5, 3).softmax(-1) * 20000
    assert counts[2] == 0 and counts[4:].sum() == 0
    assert torch.allclose(counts.float(), expected, atol=300)


def test_greedy_fast_path_is_argmax_without_softmax(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = fixed_logits(5, seed=8)
    batch = batch_of(
        [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=1)] * 2 + [SamplingParams(temperature=0)]
    )
    assert batch.all_greedy and not batch.needs_processing

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("softmax on the greedy fast path")

    monkeypatch.setattr(torch.Tensor, "softmax", boom)
    out = sample(logits, batch)
    assert out.token_ids.tolist() == logits.argmax(-1).tolist() and out.logprobs is None


def test_greedy_rows_in_a_mixed_batch_take_argmax_of_processed_logits() -> None:
    logits = fixed_logits(3, seed=9)
    top = int(logits[0].argmax())
    params = [
        SamplingParams(temperature=0, presence_penalty=2.0),
        SamplingParams(temperature=1.5, seed=3),
        SamplingParams(temperature=0, top_k=2, top_p=0.1),
    ]
    batch = batch_of(params, outputs=[[top], [], []])
    out = sample(logits, batch)
    assert out.token_ids[0] == apply_penalties(logits, batch)[0].argmax()
    assert out.token_ids[2] == logits[2].argmax()


def test_logprobs_are_log_softmax_of_processed_logits() -> None:
    logits = fixed_logits(3, seed=10)
    params = [
        SamplingParams(temperature=0.6, top_k=4, frequency_penalty=0.5, logprobs=True, top_logprobs=5, seed=1),
        SamplingParams(temperature=0, repetition_penalty=1.2, logprobs=True, top_logprobs=2),
        SamplingParams(temperature=1.3),
    ]
    outputs = [[1, 1, 2], [3], [4]]
    batch = batch_of(params, [[5], [6], [7]], outputs)
    out = sample(logits, batch)
    assert out.logprobs is not None and out.top_ids is not None and out.top_logprobs is not None
    assert out.top_ids.shape == (3, 5)
    processed = [ref_penalties(logits[r].tolist(), [[5], [6], [7]][r], outputs[r], params[r]) for r in range(3)]
    temps = torch.tensor([[0.6], [1.0], [1.3]])  # greedy rows: temperature 1
    expected = (torch.tensor(processed) / temps).log_softmax(-1)
    torch.testing.assert_close(out.logprobs, expected.gather(-1, out.token_ids[:, None])[:, 0])
    torch.testing.assert_close(out.top_logprobs, expected.topk(5, -1).values)
    torch.testing.assert_close(out.top_logprobs, expected.gather(-1, out.top_ids))
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    assert out.top_ids[1, 0] == out.token_ids[1]  # greedy: the chosen token is the most likely


def test_logprobs_without_alternatives() -> None:
    logits = fixed_logits(2, seed=11)
    out = sample(logits, batch_of([SamplingParams(temperature=0, logprobs=True), SamplingParams(temperature=0)]))
    assert out.top_ids is None and out.top_logprobs is None and out.logprobs is not None
    torch.testing.assert_close(out.logprobs, logits.log_softmax(-1).amax(-1))


def test_sample_does_not_modify_its_input() -> None:
    logits = fixed_logits(2, seed=12)
    before = logits.clone()
    params = [SamplingParams(top_k=3, repetition_penalty=2.0, logit_bias={1: 3.0}), SamplingParams(temperature=0)]
    sample(logits, batch_of(params, [[1, 2]] * 2, [[3]] * 2))
    assert torch.equal(logits, before)
