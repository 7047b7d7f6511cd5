"""`idefix bench` end to end on toy models, so the tool never rots (marked `bench`: `python -m pytest -m bench`).

Every code path runs: idefix (plain and, where loading supports it, quantized in situ), the transformers
comparison, mistral.rs (or its "not installed" skip), the random-shape checkpoint writer, the CLI with its
markdown table and JSON file. The figures themselves are not judged, only that each one is there and sane.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest

from idefix.bench import BenchOptions, run_bench
from idefix.bench.cli import run as bench_cli
from idefix.bench.report import markdown
from idefix.errors import InvalidRequestError
from idefix.loading import load

pytestmark = pytest.mark.bench

QUICK: dict[str, Any] = dict(
    concurrency=(1, 2),
    decode_tokens=3,
    decode_prompt_tokens=6,
    prefill_tokens=24,
    tiles=1,
    image_size=48,
    warmup=1,
    repeats=2,
    bandwidth_mib=8,
    threads=2,
)
ISQ = ("Q8_0",) if "isq" in inspect.signature(load).parameters else ()


def _check_run(run: dict[str, Any], concurrency: tuple[int, ...], encode: bool = True) -> None:
    assert "error" not in run, run.get("error")
    metrics = run["metrics"]
    assert metrics["errors"] == {}
    assert metrics["load_s"]["n"] == 1 and metrics["load_s"]["median"] > 0
    timed = ["prefill_tok_s", "ttft_ms"] + (["encode_ms_per_tile"] if encode else [])
    for key in timed:
        stats = metrics[key]
        assert stats["n"] == 2 and 0 < stats["min"] <= stats["median"] <= stats["max"]
    assert sorted(metrics["decode"], key=int) == [str(batch) for batch in concurrency]
    for entry in metrics["decode"].values():
        assert entry["tok_s"]["median"] > 0
        assert entry["roofline_tok_s"] > 0 and entry["roofline_fraction"] == pytest.approx(
            entry["tok_s"]["median"] / entry["roofline_tok_s"]
        )
    assert metrics["peak_rss_mib"] > 0


def test_idefix_isq_and_transformers_on_a_checkpoint(small_checkpoint: Path) -> None:
    pytest.importorskip("transformers")
    options = BenchOptions(model=str(small_checkpoint), compare=("transformers",), isq=ISQ, **QUICK)
    result = run_bench(options, log=lambda line: None)

    labels = [run["label"] for run in result["runs"]]
    assert labels == ["idefix", *(f"idefix {q}" for q in ISQ), "transformers"]
    for run in result["runs"]:
        _check_run(run, options.concurrency)
    idefix, reference = result["runs"][0]["metrics"], result["runs"][-1]["metrics"]
    # the same checkpoint and dtype read the same weight bytes per token, whoever runs it
    assert idefix["weight_bytes_per_token"] == reference["weight_bytes_per_token"] > 0
    if ISQ:  # Q8_0 stores a quarter of the fp32 bytes of the quantized layers (plus scales)
        assert result["runs"][1]["metrics"]["weight_bytes_per_token"] < idefix["weight_bytes_per_token"]
    ratio = result["ratios"]["transformers"]
    speedup = idefix["decode"]["1"]["tok_s"]["median"] / reference["decode"]["1"]["tok_s"]["median"]
    assert ratio["decode"]["1"] == pytest.approx(speedup)
    assert result["workload"]["image_tiles"] >= 1 and result["workload"]["image_prompt_tokens"] > 0
    roof = result["roofline"]
    assert roof["bandwidth_gbs"]["max"] > 0 and roof["gemm"]["gflops"]["max"] > 0
    assert roof["vision_bound_ms_per_tile"] > 0

    table = markdown(json.loads(json.dumps(result)))  # what --json holds renders the same table
    assert "| metric | idefix |" in table and "idefix / transformers" in table
    assert "decode x2 (tok/s" in table and "peak RSS (MiB)" in table


def test_cli_on_a_random_shape_with_mistralrs_or_its_skip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    argv = ["--random-shape", "tiny", "--cache-dir", str(tmp_path / "cache"), "--compare", "mistralrs"]
    argv += ["--concurrency", "1", "2", "--decode-tokens", "3", "--decode-prompt-tokens", "6"]
    argv += ["--prefill-tokens", "24", "--image-size", "48", "--tiles", "1", "--repeats", "2"]
    argv += ["--bandwidth-mib", "8", "--threads", "2", "--json", str(out)]
    assert bench_cli(argv) == 0

    result = json.loads(out.read_text())
    assert result["random_weights"] and (tmp_path / "cache" / "tiny-bf16" / ".complete").exists()
    _check_run(result["runs"][0], (1, 2))
    stdout = capsys.readouterr().out
    assert stdout.startswith("### idefix bench: tiny (random weights, real shapes), fp32")
    if "mistralrs" in result["skipped"]:
        assert "not installed" in result["skipped"]["mistralrs"] and "mistralrs: skipped" in stdout
    else:
        _check_run(result["runs"][1], (1, 2), encode=False)
        assert "encode_ms_per_tile" not in result["runs"][1]["metrics"]
        assert result["ratios"]["mistralrs"]["decode"]["2"] > 0


def test_bad_options_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InvalidRequestError):
        BenchOptions()  # neither a model nor a random shape
    assert bench_cli(["--random-shape", "tiny", "--decode-tokens", "1"]) == 1
    assert capsys.readouterr().err.strip() == "idefix bench: error: decode_tokens is too small"


def test_mistralrs_absent_is_a_skip_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from idefix.bench import mistralrs_side

    monkeypatch.setattr(mistralrs_side.importlib.util, "find_spec", lambda name: None)
    reason = mistralrs_side.missing_reason(BenchOptions(random_shape="tiny"))
    assert reason == "the mistralrs package is not installed (pip install mistralrs)"
