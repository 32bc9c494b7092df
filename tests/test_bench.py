"""`gemma2 bench` (benchmarks/cpu_speed.py): end to end on a tiny shape, the bytes one decode step reads,
and the command that runs it from the checkout."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, tiny_config
from torch import nn

from gemma2 import Gemma2ForCausalLM, cli

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
BENCH_MODULES = ("cpu_speed", "bench_setup", "bench_runners", "bench_gguf", "bench_report")
sys.path.insert(0, str(BENCHMARKS))  # the benchmark's modules import each other by name

import bench_runners  # noqa: E402
import bench_setup  # noqa: E402
import cpu_speed  # noqa: E402


def tiny_linear_and_norm_params(config: dict) -> int:
    """Parameters of everything but the embedding, counted by hand from the shape."""
    d, inter, heads, kv, head_dim = (
        config[k]
        for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    )
    attention = heads * head_dim * d + 2 * kv * head_dim * d + d * heads * head_dim  # q, k, v, o
    mlp = 3 * inter * d  # gate, up, down
    norms = 4 * d
    return config["num_hidden_layers"] * (attention + mlp + norms) + d  # + the final norm


def test_decode_bytes_per_token_counts_the_tied_embedding_once() -> None:
    model = Gemma2ForCausalLM(tiny_config()).to(torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = TINY["vocab_size"] * TINY["hidden_size"]
    assert bench_runners.decode_bytes_per_token(model) == 2 * (embedding + tiny_linear_and_norm_params(TINY))


def test_decode_bytes_per_token_skips_a_lookup_only_embedding() -> None:
    # An LM head of its own (here float32): the head is read per token, the embedding only looked up.
    model = Gemma2ForCausalLM(tiny_config()).to(torch.bfloat16)
    model.lm_head = nn.Linear(TINY["hidden_size"], TINY["vocab_size"], bias=False)
    embedding = TINY["vocab_size"] * TINY["hidden_size"]
    assert bench_runners.decode_bytes_per_token(model) == 4 * embedding + 2 * tiny_linear_and_norm_params(TINY)


def test_bench_rejects_unknown_names(tmp_path: Path, capsys) -> None:
    config = tmp_path / "config.json"
    config.write_text(tiny_config(max_position_embeddings=256).to_json_string())
    assert cpu_speed.main(["--config", str(config), "--skip", "prefil512"]) == 2
    assert "--skip: unknown ['prefil512']" in capsys.readouterr().err


def test_bench_end_to_end_on_a_tiny_shape(tmp_path: Path, capsys) -> None:
    config = tmp_path / "config.json"
    config.write_text(tiny_config(max_position_embeddings=256).to_json_string())
    report_file = tmp_path / "report.json"
    args = ["--config", str(config), "--dir", str(tmp_path / "checkpoint"), "--json", str(report_file)]
    args += ["--programs", "gemma2,transformers", "--quantize", "none", "--repeats", "1", "--decode-tokens", "4"]
    args += ["--prompt", "16", "--long-prompt", "32", "--context", "40", "--batch", "2", "--bandwidth-gib", "0.01"]
    assert cpu_speed.main(args) == 0

    out = capsys.readouterr().out
    for label in ("load s", "prefill 16 tok/s", "prefill 32 tok/s", "decode b2 tok/s", "decode @40 ctx tok/s"):
        assert label in out
    assert "gemma2 / transformers" in out and "bf16 decode / bandwidth bound" in out

    report = json.loads(report_file.read_text())
    rows = ("load_s", "first_forward_s", "peak_rss_gb", "peak_rss_run_gb", *bench_setup.MEASUREMENTS)
    for program in ("gemma2", "transformers"):
        result = report["programs"][program]
        assert result["status"] == "ok"
        for key in rows:
            assert result[key] > 0, (program, key)
        # --repeats 1: one decode run, with the bandwidth probed right before it.
        [run] = result["decode_runs"]
        assert run["tok_s"] > 0 and run["bandwidth_gbs"] > 0
        [run] = result["ctx4096_runs"]  # the long-context decode is paired with a probe too
        assert run["tok_s"] > 0 and run["bandwidth_gbs"] > 0
    assert "interleaved" in out
    slowdown = report["programs"]["gemma2"]["ctx4096_interleaved_slowdown"]
    assert -1 < slowdown < 1
    assert report["programs"]["transformers"].get("ctx4096_interleaved_slowdown") is None
    weights = 2 * (TINY["vocab_size"] * TINY["hidden_size"] + tiny_linear_and_norm_params(TINY))
    assert report["shape"]["weight_bytes"] == weights
    assert report["programs"]["gemma2"]["decode_bytes_per_token"] == weights
    assert report["machine"]["bandwidth_gbs"] > 0 and report["machine"]["matmul_bf16_gflops"] > 0
    assert {t["name"] for t in report["targets"]} >= {"bf16 decode / transformers", "load + first forward (bf16)"}
    assert (tmp_path / "checkpoint" / "config.json").exists()  # --dir keeps the checkpoint


class SleepingRunner(bench_runners.Runner):
    """Stamps one token every 10 ms of real time, calling after_token like the real runners."""

    def generation_stamps(self, ids, new_tokens, after_token=lambda i: None):  # type: ignore[no-untyped-def]
        stamps = []
        for i in range(new_tokens):
            time.sleep(0.01)
            stamps.append(time.perf_counter())
            after_token(i)
        return stamps


class SlowProbe:
    def __init__(self) -> None:
        self.calls = 0

    def measure(self) -> float:
        self.calls += 1
        time.sleep(0.05)
        return 40.0 + self.calls


def test_decode_runs_pair_each_run_with_a_bandwidth_probe_and_leave_its_time_out() -> None:
    probe = SlowProbe()
    runs = bench_runners.decode_runs(SleepingRunner(), torch.zeros(2, 3, dtype=torch.long), 13, 3, probe)  # type: ignore[arg-type]
    assert probe.calls == 3
    assert [bandwidth for _, bandwidth in runs] == [41.0, 42.0, 43.0]
    for rate, _ in runs:
        # 2 rows, one step per 10 ms: 200 tokens/s; counting the 50 ms probe in 4 steps would give 89.
        assert 120 < rate <= 200, rate
    without = bench_runners.decode_runs(SleepingRunner(), torch.zeros(1, 3, dtype=torch.long), 5, 2)
    assert [bandwidth for _, bandwidth in without] == [None, None]


def test_interleaved_context_slowdown_times_each_decode_separately(monkeypatch) -> None:
    """Steps of the two decodes alternate; each one's median step time goes into the ratio."""
    import gemma2.generation

    def fake_steps(model, ids, max_new_tokens, **kwargs):  # type: ignore[no-untyped-def]
        pause = 0.002 if ids.shape[1] < 10 else 0.004  # the long context takes twice as long per step
        for _ in range(max_new_tokens):
            time.sleep(pause)
            yield torch.zeros(1, dtype=torch.long)

    monkeypatch.setattr(gemma2.generation, "generate_steps", fake_steps)
    runner = bench_runners.Gemma2Runner(nn.Linear(1, 1))
    slowdown = runner.context_slowdown(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 20, dtype=torch.long), 9)
    assert 0.35 < slowdown < 0.55, slowdown  # 1 - 2/4 ms


def test_other_commands_do_not_import_the_benchmark() -> None:
    """Building the parser and parsing another command (or --help) leaves benchmarks/ alone."""
    check = (
        "import sys\n"
        "from gemma2 import cli\n"
        "parser = cli.build_parser()\n"
        "parser.parse_args(['info'])\n"
        "try:\n"
        "    cli.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        f"loaded = [m for m in {BENCH_MODULES!r} + ('gemma2.bench',) if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        f"assert {str(BENCHMARKS)!r} not in sys.path, sys.path\n"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "bench" in done.stdout  # the command is listed


def test_bench_help_through_the_cli_is_the_benchmarks_own(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gemma2 bench")
    assert "CPU inference speed of Gemma 2" in out
    for option in ("--decode-tokens", "--programs", "--skip", "--json"):
        assert option in out


def test_bench_options_pass_through_the_cli(tmp_path: Path, capsys) -> None:
    config = tmp_path / "config.json"
    config.write_text(tiny_config(max_position_embeddings=256).to_json_string())
    assert cli.main(["bench", "--config", str(config), "--skip", "prefil512"]) == 2
    assert "--skip: unknown ['prefil512']" in capsys.readouterr().err


def test_bench_without_the_checkout_is_a_one_line_error(tmp_path: Path, monkeypatch, capsys) -> None:
    # An installed wheel: gemma2 lives in site-packages, with no benchmarks/ directory next to it.
    monkeypatch.setattr(cli, "_benchmarks_dir", lambda: tmp_path / "benchmarks")
    assert cli.main(["bench", "--layers", "2"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "gemma2 bench" in err and "source checkout" in err
