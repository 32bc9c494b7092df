"""`gemma2 bench` (gemma2.bench): end to end on a tiny shape, and the bytes one decode step reads."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from conftest import TINY, tiny_config
from torch import nn

from gemma2 import Gemma2ForCausalLM, bench


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
    assert bench.decode_bytes_per_token(model) == 2 * (embedding + tiny_linear_and_norm_params(TINY))


def test_decode_bytes_per_token_skips_a_lookup_only_embedding() -> None:
    # An LM head of its own (here float32): the head is read per token, the embedding only looked up.
    model = Gemma2ForCausalLM(tiny_config()).to(torch.bfloat16)
    model.lm_head = nn.Linear(TINY["hidden_size"], TINY["vocab_size"], bias=False)
    embedding = TINY["vocab_size"] * TINY["hidden_size"]
    assert bench.decode_bytes_per_token(model) == 4 * embedding + 2 * tiny_linear_and_norm_params(TINY)


def test_bench_rejects_unknown_names(tmp_path: Path, capsys) -> None:
    config = tmp_path / "config.json"
    config.write_text(tiny_config(max_position_embeddings=256).to_json_string())
    assert bench.main(["--config", str(config), "--skip", "prefil512"]) == 2
    assert "--skip: unknown ['prefil512']" in capsys.readouterr().err


def test_bench_end_to_end_on_a_tiny_shape(tmp_path: Path, capsys) -> None:
    config = tmp_path / "config.json"
    config.write_text(tiny_config(max_position_embeddings=256).to_json_string())
    report_file = tmp_path / "report.json"
    args = ["--config", str(config), "--dir", str(tmp_path / "checkpoint"), "--json", str(report_file)]
    args += ["--programs", "gemma2,transformers", "--quantize", "none", "--repeats", "1", "--decode-tokens", "4"]
    args += ["--prompt", "16", "--long-prompt", "32", "--context", "40", "--batch", "2", "--bandwidth-gib", "0.01"]
    assert bench.main(args) == 0

    out = capsys.readouterr().out
    for label in ("load s", "prefill 16 tok/s", "prefill 32 tok/s", "decode b2 tok/s", "decode @40 ctx tok/s"):
        assert label in out
    assert "gemma2 / transformers" in out and "bf16 decode / bandwidth bound" in out

    report = json.loads(report_file.read_text())
    rows = ("load_s", "first_forward_s", "peak_rss_gb", "peak_rss_run_gb", *bench.MEASUREMENTS)
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


class SleepingRunner(bench.Runner):
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
    runs = bench.decode_runs(SleepingRunner(), torch.zeros(2, 3, dtype=torch.long), 13, 3, probe)  # type: ignore[arg-type]
    assert probe.calls == 3
    assert [bandwidth for _, bandwidth in runs] == [41.0, 42.0, 43.0]
    for rate, _ in runs:
        # 2 rows, one step per 10 ms: 200 tokens/s; counting the 50 ms probe in 4 steps would give 89.
        assert 120 < rate <= 200, rate
    without = bench.decode_runs(SleepingRunner(), torch.zeros(1, 3, dtype=torch.long), 5, 2)
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
    runner = bench.Gemma2Runner(nn.Linear(1, 1))
    slowdown = runner.context_slowdown(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 20, dtype=torch.long), 9)
    assert 0.35 < slowdown < 0.55, slowdown  # 1 - 2/4 ms
