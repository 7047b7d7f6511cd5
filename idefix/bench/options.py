"""BenchOptions: what `idefix bench` measures, and on which model."""

from __future__ import annotations

from dataclasses import dataclass

from idefix.errors import InvalidRequestError

MEASUREMENTS = ("encode", "prefill", "ttft", "decode")
COMPARE = ("transformers", "mistralrs")


@dataclass(frozen=True)
class BenchOptions:
    """model: a hub id or a folder; random_shape: instead, a random-weight checkpoint of that shape, written
    to cache_dir on first use (default ~/.cache/idefix/bench or $IDEFIX_BENCH_CACHE).
    dtype: "fp32" | "bf16" compute dtype, for idefix and the peers alike; device: "cpu" | "cuda" ...
    threads: torch intra-op threads for every engine (None = torch's default).
    isq: GGML types to run idefix with as well (in-situ quantization), e.g. ("Q8_0", "Q4K").
    compare: peers measured in the same run: "transformers", "mistralrs".
    concurrency: concurrent requests of the decode measurement; decode_tokens: tokens each generates
        (EOS ignored); decode_prompt_tokens: text tokens of each (distinct) prompt.
    prefill_tokens: length of the text prompt of the prefill measurement.
    tiles: tiles per vision encoder call; image_size: side in pixels of the TTFT test image (the processor
        resizes it as it does any image).
    warmup / repeats: runs excluded / kept for every measurement (load: one run).
    bandwidth_mib: size of the memory bandwidth probe's buffer.
    skip: measurements left out ("encode", "prefill", "ttft", "decode").
    """

    model: str | None = None
    random_shape: str | None = None
    cache_dir: str | None = None
    dtype: str = "fp32"
    device: str = "cpu"
    threads: int | None = None
    isq: tuple[str, ...] = ()
    compare: tuple[str, ...] = ()
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    decode_tokens: int = 64
    decode_prompt_tokens: int = 32
    prefill_tokens: int = 512
    tiles: int = 2
    image_size: int = 512
    warmup: int = 1
    repeats: int = 3
    bandwidth_mib: int = 1024
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.model is None) == (self.random_shape is None):
            raise InvalidRequestError("name a model (a hub id or a folder) or a --random-shape, not both")
        if self.dtype not in ("fp32", "bf16"):
            raise InvalidRequestError(f"dtype must be fp32 or bf16, got {self.dtype!r}")
        for peer in self.compare:
            if peer not in COMPARE:
                raise InvalidRequestError(f"unknown peer {peer!r}; compare with {' or '.join(COMPARE)}")
        for name in self.skip:
            if name not in MEASUREMENTS:
                raise InvalidRequestError(f"unknown measurement {name!r}; skip any of {', '.join(MEASUREMENTS)}")
        counts = {
            "concurrency": min(self.concurrency, default=0),
            "decode_tokens": self.decode_tokens - 1,
            "decode_prompt_tokens": self.decode_prompt_tokens,
            "prefill_tokens": self.prefill_tokens,
            "tiles": self.tiles,
            "image_size": self.image_size,
            "repeats": self.repeats,
            "bandwidth_mib": self.bandwidth_mib,
        }
        for name, value in counts.items():
            if value < 1:
                raise InvalidRequestError(f"{name} is too small")
        if self.warmup < 0:
            raise InvalidRequestError("warmup must not be negative")

    def runs(self, name: str) -> bool:
        return name not in self.skip

    @property
    def decode_context(self) -> int:
        """Positions a decode request needs: its prompt plus its answer."""
        return self.decode_prompt_tokens + self.decode_tokens
