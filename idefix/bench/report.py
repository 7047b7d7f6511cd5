"""The markdown table of a `run_bench` result, and the idefix / peer ratios it shows."""

from __future__ import annotations

from typing import Any

BUSY_LOAD = 1.0  # 1-min load average before the run from which the table warns that others used the CPU
RATIO_KEYS = ("load_s", "encode_ms_per_tile", "prefill_tok_s", "ttft_ms", "peak_rss_mib")


def ratios(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{peer label: {metric: idefix median / peer median, "decode": {batch: ratio}}} against plain idefix."""
    base = next((run["metrics"] for run in runs if run["label"] == "idefix" and "metrics" in run), None)
    out: dict[str, dict[str, Any]] = {}
    for run in runs:
        if base is None or run["engine"] == "idefix" or "metrics" not in run:
            continue
        peer = run["metrics"]
        entry: dict[str, Any] = {}
        for key in RATIO_KEYS:
            ours, theirs = _median(base.get(key)), _median(peer.get(key))
            if ours is not None and theirs:
                entry[key] = ours / theirs
        decode = {}
        for batch, theirs in peer.get("decode", {}).items():
            ours = base.get("decode", {}).get(batch)
            if ours is not None:
                decode[batch] = ours["tok_s"]["median"] / theirs["tok_s"]["median"]
        entry["decode"] = decode
        out[run["label"]] = entry
    return out


def _median(value: Any) -> float | None:
    if isinstance(value, dict):
        return float(value["median"])
    return float(value) if isinstance(value, int | float) else None


def fmt(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def _cell(stats: dict[str, Any] | None, note: str = "") -> str:
    if stats is None:
        return "–"
    spread = f" ({fmt(stats['min'])}–{fmt(stats['max'])})" if stats["n"] > 1 else ""
    return f"{fmt(stats['median'])}{spread}{note}"


def markdown(result: dict[str, Any]) -> str:
    runs = [run for run in result["runs"] if "metrics" in run]
    peers = list(result.get("ratios", {}))
    lines = _header(result)
    head = ["metric", *(run["label"] for run in runs), *(f"idefix / {peer}" for peer in peers)]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for title, cells, ratio_key in _rows(result, runs):
        ratio_cells = [_ratio_cell(result["ratios"][peer], ratio_key) for peer in peers]
        lines.append("| " + " | ".join([title, *cells, *ratio_cells]) + " |")
    return "\n".join(lines) + "\n"


def _ratio_cell(ratio: dict[str, Any], key: str | None) -> str:
    if key is None:
        return ""
    value = ratio.get("decode", {}).get(key[len("decode:") :]) if key.startswith("decode:") else ratio.get(key)
    return "–" if value is None else f"{value:.2f}x"


def _rows(result: dict[str, Any], runs: list[dict[str, Any]]) -> list[tuple[str, list[str], str | None]]:
    """(title, one cell per run, the ratio key of the row or None)."""
    options, roof, work = result["options"], result["roofline"], result["workload"]
    bound = roof["vision_bound_ms_per_tile"]

    def cells(key: str) -> list[str]:
        return [_cell(run["metrics"].get(key)) for run in runs]

    encode = [run["metrics"].get("encode_ms_per_tile") for run in runs]
    image = f"{work.get('image_tiles', '?')} tiles, {work.get('image_prompt_tokens', '?')} tokens"
    rows: list[tuple[str, list[str], str | None]] = [
        ("load (s)", cells("load_s"), "load_s"),
        (
            f"vision encode (ms / tile, {options['tiles']} per call; · share of the GEMM bound)",
            [_cell(s, f" · {bound / s['median']:.0%}" if s else "") for s in encode],
            "encode_ms_per_tile",
        ),
        (f"prefill (tok/s, {options['prefill_tokens']}-token text prompt)", cells("prefill_tok_s"), "prefill_tok_s"),
        (f"TTFT, 1 image (ms; {image})", cells("ttft_ms"), "ttft_ms"),
    ]
    batches = [str(batch) for batch in options["concurrency"]]
    for batch in batches:
        row = []
        for run in runs:
            entry = run["metrics"].get("decode", {}).get(batch)
            fraction = entry.get("roofline_fraction") if entry else None
            row.append(_cell(entry["tok_s"] if entry else None, f" · {fraction:.0%}" if fraction else ""))
        rows.append((f"decode x{batch} (tok/s, all requests; · share of the roofline)", row, f"decode:{batch}"))
    bounds = [
        " / ".join(fmt(run["metrics"].get("decode", {}).get(b, {}).get("roofline_tok_s", 0.0)) for b in batches)
        for run in runs
    ]
    rows.append((f"decode roofline (tok/s, x{' / x'.join(batches)})", bounds, None))
    weights = [run["metrics"].get("weight_bytes_per_token") for run in runs]
    rows.append(("weights read per token (MB)", [fmt(w / 1e6) if w else "–" for w in weights], None))
    rows.append(("peak RSS (MiB)", [fmt(run["metrics"]["peak_rss_mib"]) for run in runs], "peak_rss_mib"))
    cuda = [run["metrics"].get("peak_cuda_mib") for run in runs]
    if any(cuda):
        rows.append(("peak CUDA memory (MiB)", [fmt(c) if c else "–" for c in cuda], None))
    return rows


def _header(result: dict[str, Any]) -> list[str]:
    options, machine, roof = result["options"], result["machine"], result["roofline"]
    weights = "random weights, real shapes" if result["random_weights"] else "checkpoint weights"
    bw, gemm = roof["bandwidth_gbs"], roof["gemm"]
    shape = "x".join(map(str, gemm["shape"]))
    before, after = machine.get("load_average_before", [0.0]), machine.get("load_average_after", [0.0])
    lines = [
        f"### idefix bench: {result['model']} ({weights}), {options['dtype']}, {options['device']}, "
        f"{machine['threads']} threads",
        "",
        f"- machine: {machine['cpu']}, {machine['cpu_count']} CPUs, torch {machine['torch']}; "
        f"load average (1 min) {before[0]:.2f} before, {after[0]:.2f} after",
        f"- roofline: read bandwidth {bw['max']:.1f} GB/s (best of {bw['n']}; median {bw['median']:.1f}); "
        f"GEMM {shape} {gemm['dtype']} {fmt(gemm['gflops']['max'])} GFLOP/s, so a tile "
        f"({roof['vision_flops_per_tile'] / 1e9:.1f} GFLOP) takes at least {roof['vision_bound_ms_per_tile']:.1f} ms; "
        f"decode bound = max(bytes / bandwidth, FLOPs / GEMM rate), weights + KV at a mean context of "
        f"{roof['decode_context']:.0f}",
        f"- decode: {options['decode_prompt_tokens']}-token prompts + {options['decode_tokens']} generated tokens each "
        "(EOS ignored, every prompt distinct); rates over the steps after every prompt is prefilled",
        f"- each figure: median (min–max) of {options['repeats']} runs after {options['warmup']} warm-up, "
        "load: one run; "
        "ratios are idefix / peer (above 1 is better for tok/s, below 1 for times and memory)",
    ]
    if before[0] >= BUSY_LOAD:
        lines.append(
            f"- **the machine was busy**: a load average of {before[0]:.1f} on {machine['cpu_count']} CPUs before "
            "the run means other processes competed for the CPU; figures (and ratios, as engines ran one after "
            "the other) are noisy"
        )
    for label, reason in result.get("skipped", {}).items():
        lines.append(f"- {label}: skipped, {reason}")
    for run in result["runs"]:
        if "error" in run:
            lines.append(f"- {run['label']}: failed, {run['error']}")
        for key, error in run.get("metrics", {}).get("errors", {}).items():
            lines.append(f"- {run['label']}, {key}: failed, {error}")
    return [*lines, ""]
