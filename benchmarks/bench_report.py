"""The CPU speed benchmark's report: the main table, decode against the bandwidth bound, the targets.

The targets are the speed issue's: each is met, NOT met, or n/a where it was not measured.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench_setup import GEMMA2, LLAMA_CPP, MEASUREMENTS, TRANSFORMERS, Settings

# ----------------------------------------------------------------------------------------------
# Report


def fmt(value: float | None, digits: int | None = None) -> str:
    if value is None:
        return "-"
    if digits is not None:
        return f"{value:.{digits}f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def cell(result: dict[str, Any], key: str, settings: Settings) -> str:
    status = result.get("status")
    if status != "ok":
        return "n/a" if status == "n/a" else "failed"
    if key in MEASUREMENTS and not settings.wants(key):
        return "skip"
    return fmt(result.get(key))


def value(results: dict[str, dict[str, Any]], program: str, key: str) -> float | None:
    result = results.get(program, {})
    number = result.get(key) if result.get("status") == "ok" else None
    return float(number) if isinstance(number, (int, float)) and number > 0 else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def main_table(results: dict[str, dict[str, Any]], settings: Settings) -> str:
    labels = settings.labels()
    programs = list(results)
    show_ratio = GEMMA2 in results and TRANSFORMERS in results
    width = max(14, *(len(p) + 2 for p in programs))
    header = f"{'':<26}" + "".join(f"{p:>{width}}" for p in programs)
    header += f"{'gemma2 / transformers':>23}" if show_ratio else ""
    lines = [header]
    for key, label in labels.items():
        row = f"{label:<26}" + "".join(f"{cell(results[p], key, settings):>{width}}" for p in programs)
        if show_ratio:
            row += f"{fmt(ratio(value(results, GEMMA2, key), value(results, TRANSFORMERS, key)), 2):>23}"
        lines.append(row)
    return "\n".join(lines)


def bound_rows(results: dict[str, dict[str, Any]], bandwidth_gbs: float) -> list[dict[str, Any]]:
    """Per program: bytes per decoded token, the bandwidth bound, the share of it, b8/b1, slowdown."""
    rows = []
    for program in results:
        per_token = value(results, program, "decode_bytes_per_token")
        if per_token is None:
            continue
        decode = value(results, program, "decode")
        runs = [r for r in results[program].get("decode_runs", []) if r["bandwidth_gbs"]]
        if runs:
            # Each decode run against the bandwidth measured right before it (the median of both).
            bandwidth = statistics.median(r["bandwidth_gbs"] for r in runs)
            share = statistics.median(r["tok_s"] * per_token / (r["bandwidth_gbs"] * 1e9) for r in runs)
        else:
            bandwidth = value(results, program, "bandwidth_gbs") or bandwidth_gbs
            share = ratio(decode, bandwidth * 1e9 / per_token)
        bound = bandwidth * 1e9 / per_token
        long_context = value(results, program, "ctx4096")
        rows.append(
            {
                "program": program,
                "bandwidth_gbs": bandwidth,
                "bytes_per_token": int(per_token),
                "bound_tok_s": bound,
                "decode_tok_s": decode,
                "share_of_bound": share,
                "batch_over_single": ratio(value(results, program, "batch8"), decode),
                "long_context_slowdown": 1 - long_context / decode if long_context and decode else None,
                "long_context_slowdown_interleaved": value(results, program, "ctx4096_interleaved_slowdown"),
            }
        )
    return rows


def bound_table(rows: list[dict[str, Any]], bandwidth_gbs: float, settings: Settings) -> str:
    lines = [
        "decode against the bandwidth bound (bytes read per token, weights only, / read bandwidth measured right"
        " before each decode run, between two tokens; GB/s and share are the medians over the runs;"
        f" {bandwidth_gbs:.1f} GB/s at the start)",
        f"{'program':<16}{'GB/s':>6}{'MB/token':>10}{'bound tok/s':>13}{'decode b1':>11}{'share':>8}"
        f"{f'b{settings.batch} / b1':>9}{f'@{settings.context} slowdown':>17}{'interleaved':>13}",
    ]
    for r in rows:
        share = r["share_of_bound"]
        slowdown, interleaved = r["long_context_slowdown"], r["long_context_slowdown_interleaved"]
        lines.append(
            f"{r['program']:<16}{r['bandwidth_gbs']:>6.1f}{fmt(r['bytes_per_token'] / 1e6):>10}"
            f"{fmt(r['bound_tok_s']):>13}"
            f"{fmt(r['decode_tok_s']):>11}{'-' if share is None else f'{share:.0%}':>8}"
            f"{fmt(r['batch_over_single'], 2):>9}{'-' if slowdown is None else f'{slowdown:.1%}':>17}"
            f"{'-' if interleaved is None else f'{interleaved:.1%}':>13}"
        )
    lines.append(
        f"interleaved: the @{settings.context} slowdown with the two decodes' steps alternating in one process"
        " (the separate runs above are minutes apart, while the bandwidth drifts; gemma2 bf16 only)"
    )
    return "\n".join(lines)


@dataclass
class Target:
    name: str
    goal: str
    value: float | None
    shown: str
    met: bool | None  # None: not measured


def targets(
    results: dict[str, dict[str, Any]], rows: list[dict[str, Any]], weight_bytes: int, settings: Settings
) -> list[Target]:
    def v(program: str, key: str) -> float | None:
        return value(results, program, key)

    bf16 = next((r for r in rows if r["program"] == GEMMA2), {})
    decode = v(GEMMA2, "decode")
    # Drift-free where the program can interleave the two decodes (see bound_table).
    slowdown = bf16.get("long_context_slowdown_interleaved")
    if slowdown is None:
        slowdown = bf16.get("long_context_slowdown")
    rss = v(GEMMA2, "peak_rss_gb")
    checks: list[tuple[str, str, float | None, Callable[[float], bool], Callable[[float], str]]] = [
        ("bf16 decode / bandwidth bound", ">= 90%", bf16.get("share_of_bound"), lambda x: x >= 0.9, _pct),
        ("bf16 decode / transformers", ">= 1.6x", ratio(decode, v(TRANSFORMERS, "decode")), lambda x: x >= 1.6, _x),
        (
            f"prefill {settings.prompt} / transformers",
            ">= 2x",
            ratio(v(GEMMA2, "prefill512"), v(TRANSFORMERS, "prefill512")),
            lambda x: x >= 2,
            _x,
        ),
        ("int8 decode / bf16 decode", ">= 1.8x", ratio(v(f"{GEMMA2} int8", "decode"), decode), lambda x: x >= 1.8, _x),
        ("int4 decode / bf16 decode", ">= 3x", ratio(v(f"{GEMMA2} int4", "decode"), decode), lambda x: x >= 3, _x),
        (f"batch-{settings.batch} / batch-1 decode", ">= 5x", bf16.get("batch_over_single"), lambda x: x >= 5, _x),
        (
            f"decode @{settings.context} slowdown vs @{settings.prompt} (interleaved)",
            "<= 15%",
            slowdown,
            lambda x: x <= 0.15,
            _pct,
        ),
        (
            # Weights are memory-mapped and read on first use: count the first forward pass too.
            "load + first forward (bf16)",
            "< 10 s",
            sum(x for x in (v(GEMMA2, "load_s"), v(GEMMA2, "first_forward_s")) if x is not None) or None,
            lambda x: x < 10,
            lambda x: f"{x:.2f} s",
        ),
        (
            "peak RSS / weight bytes (bf16)",
            "<= 1.1x",
            rss * 1e9 / weight_bytes if rss and weight_bytes else None,
            lambda x: x <= 1.1,
            _x,
        ),
    ]
    # Against llama.cpp on the same weights and CPU (batch 1), where it is installed.
    llama = f"{LLAMA_CPP} bf16"
    checks += [
        ("bf16 decode / llama.cpp BF16", ">= 1x", ratio(decode, v(llama, "decode")), lambda x: x >= 1, _x),
        (
            "int8 decode / llama.cpp Q8_0",
            ">= 1x",
            ratio(v(f"{GEMMA2} int8", "decode"), v(f"{LLAMA_CPP} Q8_0", "decode")),
            lambda x: x >= 1,
            _x,
        ),
        (
            "int4 decode / llama.cpp Q4_0",
            ">= 1x",
            ratio(v(f"{GEMMA2} int4", "decode"), v(f"{LLAMA_CPP} Q4_0", "decode")),
            lambda x: x >= 1,
            _x,
        ),
        (
            f"bf16 prefill {settings.prompt} / llama.cpp BF16",
            ">= 1x",
            ratio(v(GEMMA2, "prefill512"), v(llama, "prefill512")),
            lambda x: x >= 1,
            _x,
        ),
        ("bf16 decode / bound, any CPU", ">= 80%", bf16.get("share_of_bound"), lambda x: x >= 0.8, _pct),
        (f"batch-{settings.batch} / batch-1, any CPU", ">= 4x", bf16.get("batch_over_single"), lambda x: x >= 4, _x),
    ]
    return [
        Target(name, goal, x, "-" if x is None else show(x), None if x is None else passes(x))
        for name, goal, x, passes, show in checks
    ]


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _x(x: float) -> str:
    return f"{x:.2f}x"


def targets_table(items: list[Target]) -> str:
    lines = [f"{'target (gemma2)':<40}{'value':>10}{'goal':>10}  status"]
    for t in items:
        status = "n/a" if t.met is None else ("met" if t.met else "NOT met")
        lines.append(f"{t.name:<40}{t.shown:>10}{t.goal:>10}  {status}")
    return "\n".join(lines)
