"""The synchronous engine: add requests, `step()` them forward together, read their outputs.

    engine = Engine(load("demo"))
    request_id = engine.add(engine.prepare(messages), SamplingParams(temperature=0, max_tokens=64))
    while engine.has_unfinished():
        for output in engine.step(): print(output.text, end="")

One `step()` is: schedule (pure Python) -> run one forward pass and sample (runner) -> update the
sequences: detokenize, apply stop conditions, free slots of finished ones.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq

from idefix.config import EngineConfig
from idefix.engine.graphs import DecodeGraphs
from idefix.engine.image_cache import ImageFeatureCache
from idefix.engine.kv_cache import SlotPool
from idefix.engine.runner import ModelRunner
from idefix.engine.sampler import SamplerOutput, make_generator
from idefix.engine.scheduler import Scheduler
from idefix.engine.stop import StopStrings
from idefix.errors import ContextLengthError, InvalidRequestError
from idefix.loading import LoadedModel
from idefix.media import MediaPolicy, image_digest, load_image
from idefix.processing.processor import image_sources
from idefix.processing.tokenizer import Detokenizer
from idefix.request import PreparedPrompt, RequestOutput, Sequence, TokenLogprob, Usage
from idefix.sampling import SamplingParams


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None) -> None:
        self.loaded = loaded
        self.config = config = config or EngineConfig()
        self.max_model_len = min(config.max_model_len or loaded.max_model_len, loaded.max_model_len)
        num_slots = config.max_num_seqs + config.cache_slots
        self.cache = loaded.model.new_cache(num_slots, self.max_model_len)
        self.pool = SlotPool(num_slots, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.pool)
        self.image_cache = ImageFeatureCache(config.image_cache_bytes)
        graphs = None
        if self.config.cuda_graphs and DecodeGraphs.supported(loaded.model, self.cache):
            graphs = DecodeGraphs(loaded.model, self.cache)
        self.runner = ModelRunner(loaded.model, self.cache, self.image_cache, loaded.eos_token_ids, graphs)
        self.tokenizer = loaded.processor.tokenizer
        self.requests: dict[str, list[Sequence]] = {}
        self._ids = itertools.count()

    # ------------------------------------------------------------------------------------------ requests

    def prepare(self, messages: object, policy: MediaPolicy | None = None) -> PreparedPrompt:
        """Load the images the messages name and build the prompt. Touches no engine state, so front ends
        may call it from any thread (fetching an image URL must not stall the step loop)."""
        policy = policy or MediaPolicy.trusted()
        images = [load_image(source, policy) for source in image_sources(messages)]
        prompt = self.loaded.processor(messages, images)
        config = self.loaded.model.config
        digests = tuple(image_digest(image) for image in images)
        return PreparedPrompt(prompt.token_ids, prompt.images, digests, config.image_token_id, config.image_seq_len)

    def text_prompt(self, token_ids: Seq[int]) -> PreparedPrompt:
        """A prompt given as token ids (no images)."""
        config = self.loaded.model.config
        return PreparedPrompt(list(token_ids), None, (), config.image_token_id, config.image_seq_len)

    def add(self, prompt: PreparedPrompt, params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; errors (context too long, bad ids, queue full) are raised here, before any work."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        params.check_vocab(self.loaded.model.config.text.vocab_size)
        max_tokens = self._max_tokens(len(prompt.token_ids), params)
        usage = Usage(prompt_tokens=len(prompt.token_ids))
        keys = prompt.cache_keys()
        seqs: list[Sequence] = []
        for index in range(params.n):
            seed = None if params.seed is None else params.seed + index
            seq = Sequence(
                request_id=request_id,
                index=index,
                prompt=prompt,
                params=params,
                keys=keys,
                detokenizer=Detokenizer(self.tokenizer),
                stops=StopStrings(params.stop),
                max_tokens=max_tokens,
                generator=None if params.greedy else make_generator(seed, self.runner.device),
                usage=usage,
                leader=seqs[0] if seqs else None,
            )
            seqs.append(seq)
        self.scheduler.add(seqs)
        self.requests[request_id] = seqs
        return request_id

    def _max_tokens(self, prompt_len: int, params: SamplingParams) -> int:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ContextLengthError(
                f"the prompt has {prompt_len} tokens but the context is {self.max_model_len} tokens; "
                "shorten the conversation or use fewer / smaller images"
            )
        if params.max_tokens is None:
            return room
        if params.max_tokens > room:
            raise ContextLengthError(
                f"the prompt has {prompt_len} tokens and max_tokens is {params.max_tokens}, together more than the "
                f"context of {self.max_model_len} tokens; ask for at most {room} tokens"
            )
        return params.max_tokens

    def abort(self, request_id: str) -> None:
        """Stop a request now (a client went away); unknown or finished ids are ignored."""
        for seq in self.requests.pop(request_id, []):
            self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------------------------------ stepping

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if plan.empty:
            return []
        sampled, result = self.runner.execute(plan)
        for chunk in plan.prefills:
            chunk.seq.num_computed += chunk.length
        for seq in plan.decodes:
            seq.num_computed += 1
        if result is None:
            return []
        now = time.perf_counter()
        outputs = [self._advance(seq, row, result, now) for row, seq in enumerate(sampled)]
        for seq in sampled:
            choices = self.requests.get(seq.request_id, [])
            if choices and all(choice.finish_reason for choice in choices):
                del self.requests[seq.request_id]
        return outputs

    def _advance(self, seq: Sequence, row: int, result: SamplerOutput, now: float) -> RequestOutput:
        token = int(result.token_ids[row])
        usage = seq.usage
        if usage.time_to_first_token == 0.0:
            usage.time_to_first_token = usage.total_prompt_time_sec = now - seq.arrival
        if seq.first_token_time is None:
            seq.first_token_time = now
        params, text, new_tokens = seq.params, "", []
        stopped = token in params.stop_token_ids or (token in self.runner.eos_ids and not params.ignore_eos)
        if not stopped:
            seq.output_ids.append(token)
            usage.completion_tokens += 1
            new_tokens = [token]
            text, stopped = seq.stops.feed(seq.detokenizer.add([token]))
        reason = "stop" if stopped else None
        if not stopped and (len(seq.output_ids) >= seq.max_tokens or seq.total_len >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if not seq.stops.stopped:
                tail, _ = seq.stops.feed(seq.detokenizer.flush())
                text += tail + seq.stops.flush()
            self.scheduler.finish(seq, reason)
            usage.total_completion_time_sec = max(usage.total_completion_time_sec, now - seq.first_token_time)
        seq.text += text
        return RequestOutput(
            request_id=seq.request_id,
            index=seq.index,
            text=text,
            token_ids=new_tokens,
            finished=reason is not None,
            finish_reason=reason,
            logprobs=_logprobs(seq.params, row, token, result) if new_tokens else None,
            usage=usage,
        )


def _logprobs(params: SamplingParams, row: int, token: int, result: SamplerOutput) -> list[TokenLogprob] | None:
    if not params.logprobs or result.logprobs is None:
        return None
    top: tuple[tuple[int, float], ...] = ()
    if params.top_logprobs and result.top_ids is not None and result.top_logprobs is not None:
        ids = result.top_ids[row, : params.top_logprobs].tolist()
        values = result.top_logprobs[row, : params.top_logprobs].tolist()
        top = tuple(zip(ids, values, strict=True))
    return [TokenLogprob(token, float(result.logprobs[row]), top)]
