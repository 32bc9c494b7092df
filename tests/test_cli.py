"""The gemma2 command line, run as the real `gemma2` executable in a subprocess.

Every subprocess gets GEMMA2_CACHE pointing at one cache directory for the whole session, seeded
with the real Gemma tokenizer so nothing is downloaded; the default model is built there on first use.
Outputs are compared as UTF-8 bytes (no newline translation): a random model's text can hold "\\r".
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import randomize_, tiny_config

import gemma2
from gemma2 import Gemma2ForCausalLM, Gemma2Tokenizer
from gemma2.cache import cache_memory_bytes
from gemma2.cli import main
from gemma2.io.assets import gemma_tokenizer_model
from gemma2.io.default_model import BUNDLED, BUNDLED_NOTICE, RANDOM_NOTICE

GEMMA2 = Path(sys.executable).parent / "gemma2"
N = 6  # new tokens per generation: enough to tell outputs apart, cheap with a 256000-token vocabulary

# Small, but with the real tokenizer's vocabulary; the long context makes the KV-cache numbers of
# `info` large enough to check to 0.1 MiB, and the sliding layer keeps fewer slots than a full one.
CLI_MODEL = dict(
    vocab_size=256000,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=4096,
    max_position_embeddings=65536,
)


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture(scope="session")
def cache_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for the subprocesses: a fresh GEMMA2_CACHE that already holds the real tokenizer."""
    cache = tmp_path_factory.mktemp("gemma2-cache")
    (cache / "gemma-tokenizer").mkdir()
    shutil.copyfile(gemma_tokenizer_model(), cache / "gemma-tokenizer" / "tokenizer.model")
    return {**os.environ, "GEMMA2_CACHE": str(cache), "PYTHONIOENCODING": "utf-8", "HF_HUB_OFFLINE": "1"}


def run_cli(env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 120) -> Result:
    done = subprocess.run(
        [str(GEMMA2), *args],
        input=None if stdin is None else stdin.encode(),
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    return Result(done.returncode, done.stdout.decode("utf-8"), done.stderr.decode("utf-8"))


@dataclass
class Checkpoint:
    directory: Path
    model: Gemma2ForCausalLM  # loaded back from the directory in fp32, as `--dtype fp32` does
    tok: Gemma2Tokenizer

    def text(self, prompt: str | list[dict[str, str]], **kwargs: Any) -> str:
        return "".join(gemma2.stream(self.model, self.tok, prompt, **{"max_new_tokens": N, **kwargs}))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    directory = tmp_path_factory.mktemp("cli-model") / "tiny"
    model = randomize_(Gemma2ForCausalLM(tiny_config(**CLI_MODEL)), seed=1, std=0.05).eval()
    model.save_pretrained(directory)
    shutil.copyfile(gemma_tokenizer_model(), directory / "tokenizer.model")
    Gemma2Tokenizer.from_pretrained(directory).save_pretrained(directory)
    loaded = Gemma2ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return Checkpoint(directory, loaded, Gemma2Tokenizer.from_pretrained(directory))


def model_args(ckpt: Checkpoint, *more: str) -> list[str]:
    return ["--model", str(ckpt.directory), "--dtype", "fp32", "--max-new-tokens", str(N), *more]


def assert_one_line_error(result: Result, *needles: str) -> None:
    assert result.code == 2, result
    assert "Traceback" not in result.err, result.err
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("gemma2: error:"), result.err
    for needle in needles:
        assert needle in lines[0], (needle, result.err)


# -- generate ------------------------------------------------------------------------------------


def test_generate_greedy_output_equals_the_library(ckpt: Checkpoint, cache_env: dict[str, str]) -> None:
    prompt = "The capital of France is"
    expected = ckpt.text(prompt)
    assert expected  # a non-empty completion, or the comparison would prove little
    result = run_cli(cache_env, "generate", *model_args(ckpt), prompt)
    assert result.code == 0, result
    assert result.out == expected + "\n"
    assert result.err == ""  # --model given: no notice about the default model


def test_generate_chat_wraps_the_prompt_as_a_user_turn(ckpt: Checkpoint, cache_env: dict[str, str]) -> None:
    prompt = "Write a haiku about the sea."
    expected = ckpt.text([{"role": "user", "content": prompt}])
    assert expected != ckpt.text(prompt)  # the chat format changes the output, so the flag is observable
    result = run_cli(cache_env, "generate", *model_args(ckpt, "--chat"), prompt)
    assert result.code == 0, result
    assert result.out == expected + "\n"


def test_generate_reads_the_prompt_from_stdin(ckpt: Checkpoint, cache_env: dict[str, str]) -> None:
    prompt = "Once upon a time"
    result = run_cli(cache_env, "generate", *model_args(ckpt), stdin=prompt)
    assert result.code == 0, result
    assert result.out == ckpt.text(prompt) + "\n"


def test_generate_same_seed_same_sample(ckpt: Checkpoint, cache_env: dict[str, str]) -> None:
    prompt = "Tell me a story"
    args = ["generate", *model_args(ckpt, "--temperature", "1.0", "--seed", "7"), prompt]
    first, second = run_cli(cache_env, *args), run_cli(cache_env, *args)
    assert first.code == second.code == 0, (first, second)
    assert first.out == second.out
    sample = ckpt.text(prompt, do_sample=True, temperature=1.0, seed=7)
    assert first.out == sample + "\n"
    # Near-uniform random weights: a sample is (all but surely) not the greedy completion.
    assert sample != ckpt.text(prompt)


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param(["--temperature", "0"], id="temperature-0"),
        # The help says "unset or 0 means greedy": an explicit 0 must win over other sampling flags.
        pytest.param(["--temperature", "0", "--top-k", "50", "--seed", "3"], id="temperature-0-with-top-k"),
    ],
)
def test_generate_temperature_zero_is_greedy(ckpt: Checkpoint, cache_env: dict[str, str], flags: list[str]) -> None:
    prompt = "Tell me a story"
    greedy = ckpt.text(prompt)
    assert greedy != ckpt.text(prompt, do_sample=True, temperature=1.0, top_k=50, seed=3)  # the test can fail
    result = run_cli(cache_env, "generate", *model_args(ckpt, *flags), prompt)
    assert result.code == 0, result
    assert result.out == greedy + "\n"


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--top-p", "1.5"], "1.5"),
        (["--temperature", "-1"], "-1"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
    ],
    ids=["top-p-1.5", "temperature-negative", "max-new-tokens-0"],
)
def test_generate_rejects_invalid_sampling_values(
    ckpt: Checkpoint, cache_env: dict[str, str], flags: list[str], needle: str
) -> None:
    result = run_cli(cache_env, "generate", *model_args(ckpt), *flags, "hello")
    assert_one_line_error(result, needle)
    assert result.out == ""


# -- chat ----------------------------------------------------------------------------------------


def test_chat_answers_each_line_and_keeps_the_history(ckpt: Checkpoint, cache_env: dict[str, str]) -> None:
    first = ckpt.text([{"role": "user", "content": "hi"}])
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "how are you"},
    ]
    second = ckpt.text(history)
    assert second != ckpt.text(history[-1:])  # the history changes the reply, so keeping it is observable
    result = run_cli(cache_env, "chat", *model_args(ckpt), stdin="hi\nhow are you\n")  # then EOF (Ctrl-D)
    assert result.code == 0, result
    assert "Traceback" not in result.err
    # Not a terminal: no "you>"/"model>" prompts, just each reply on its own line.
    assert result.out == first + "\n" + second + "\n"


def test_chat_reset_and_exit_commands(ckpt: Checkpoint, cache_env: dict[str, str]) -> None:
    first = ckpt.text([{"role": "user", "content": "hi"}])
    fresh = ckpt.text([{"role": "user", "content": "how are you"}])
    stdin = "hi\n\n/reset\nhow are you\n/exit\nthis line is never answered\n"
    result = run_cli(cache_env, "chat", *model_args(ckpt), stdin=stdin)
    assert result.code == 0, result
    # The blank line is skipped, /reset forgets "hi", /exit stops before the last line.
    assert result.out == first + "\n" + fresh + "\n"


def test_chat_stops_cleanly_on_ctrl_c(ckpt: Checkpoint, cache_env: dict[str, str]) -> None:
    expected = (ckpt.text([{"role": "user", "content": "hi"}]) + "\n").encode()
    proc = subprocess.Popen(
        [str(GEMMA2), "chat", *model_args(ckpt)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cache_env,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"hi\n")
        proc.stdin.flush()
        got = b""
        deadline = time.monotonic() + 60
        while len(got) < len(expected) and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                got += chunk
        assert got == expected  # the model is loaded and the chat now waits for the next line
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err.decode()
    assert rest in (b"", b"\n")  # at most the newline that leaves the terminal on a fresh line


# -- info ----------------------------------------------------------------------------------------


def test_info_reports_parameters_dtype_weights_and_cache(ckpt: Checkpoint, cache_env: dict[str, str]) -> None:
    result = run_cli(cache_env, "info", "--model", str(ckpt.directory))
    assert result.code == 0, result
    out, config = result.out, ckpt.model.config
    params = ckpt.model.num_parameters()
    assert f"checkpoint: {ckpt.directory}" in out
    assert f"parameters: {params:,} " in out
    assert f"stored dtype: float32; weights: {params * 4 / 2**20:,.1f} MiB" in out  # saved in fp32
    # Layer 0 slides (keeps its 4096-token window), layer 1 is full (all 65536 positions), bf16 K and V.
    per_token = 2 * config.num_key_value_heads * config.head_dim * 2
    cache = cache_memory_bytes(config, config.max_position_embeddings, bytes_per_value=2)
    assert cache == (4096 + 65536) * per_token
    everything = 2 * 65536 * per_token
    assert (
        f"KV cache at 65536 tokens, batch 1, bf16: {cache / 2**20:,.1f} MiB "
        f"(sliding layers keep 4096 slots; {everything / 2**20:,.1f} MiB if every layer kept all)"
    ) in out
    assert "8.5 MiB" in out and "16.0 MiB" in out
    # The config follows, as JSON.
    printed = json.loads(out[out.index("{") :])
    assert printed["model_type"] == "gemma2" and printed["hidden_size"] == 16 and printed["vocab_size"] == 256000


# -- the default model ---------------------------------------------------------------------------


def test_generate_without_model_uses_the_bundled_demo_model(cache_env: dict[str, str]) -> None:
    result = run_cli(cache_env, "generate", "The for statement", "--max-new-tokens", "12", timeout=300)
    assert result.code == 0, result
    assert result.err.splitlines() == [BUNDLED_NOTICE]
    model = Gemma2ForCausalLM.from_pretrained(BUNDLED, dtype=torch.bfloat16)
    expected = "".join(
        gemma2.stream(model, Gemma2Tokenizer.from_pretrained(BUNDLED), "The for statement", max_new_tokens=12)
    )
    assert result.out == expected + "\n"


def test_the_random_fallback_when_no_model_is_bundled(
    monkeypatch: pytest.MonkeyPatch, cache_env: dict[str, str]
) -> None:
    import gemma2.io.default_model as default

    monkeypatch.setenv("GEMMA2_CACHE", cache_env["GEMMA2_CACHE"])
    monkeypatch.setattr(default, "BUNDLED", Path(cache_env["GEMMA2_CACHE"]) / "no-such-bundle")
    directory, notice = default.default_model()
    assert notice == RANDOM_NOTICE and "random" in notice
    assert directory == Path(cache_env["GEMMA2_CACHE"]) / "random-tiny-gemma2-v1"
    assert Gemma2Tokenizer.from_pretrained(directory).vocab_size == 256000


def test_info_without_model(cache_env: dict[str, str]) -> None:
    result = run_cli(cache_env, "info", timeout=300)
    assert result.code == 0, result
    assert result.err.splitlines() == [BUNDLED_NOTICE]
    assert f"checkpoint: {BUNDLED}" in result.out
    assert "stored dtype: bfloat16" in result.out and '"vocab_size": 8000' in result.out


# -- errors --------------------------------------------------------------------------------------


def _broken(kind: str, good: Path, root: Path) -> Path:
    """A directory that is wrong in one way; the rest is a valid checkpoint with its tokenizer."""
    directory = root / kind
    if kind == "missing":
        return directory
    shutil.copytree(good, directory)
    if kind in ("llama", "gemma"):
        config = json.loads((directory / "config.json").read_text())
        config["model_type"] = kind
        (directory / "config.json").write_text(json.dumps(config))
    elif kind == "no-tokenizer":
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (directory / name).unlink(missing_ok=True)
    elif kind == "corrupt":
        (directory / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + bytes(64))
    return directory


@pytest.mark.parametrize(
    "command, kind",
    [
        ("generate", "missing"),
        ("generate", "llama"),
        ("info", "gemma"),
        ("chat", "no-tokenizer"),
        ("generate", "corrupt"),
        ("info", "corrupt"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(
    ckpt: Checkpoint, cache_env: dict[str, str], tmp_path: Path, command: str, kind: str
) -> None:
    directory = _broken(kind, ckpt.directory, tmp_path)
    args = [command, "--model", str(directory)]
    if command == "generate":
        args.append("hello")
    result = run_cli(cache_env, *args, stdin="hello\n")
    assert_one_line_error(result, str(directory))
    if kind in ("llama", "gemma"):
        assert kind in result.err  # says what the checkpoint is instead
    assert result.out == ""


# -- help ----------------------------------------------------------------------------------------


SAMPLING_OPTIONS = ["--model", "--dtype", "--max-new-tokens", "--temperature", "--top-p", "--top-k", "--seed"]


@pytest.mark.parametrize(
    "command, options",
    [
        ([], ["generate", "chat", "info", "logits", "/reset", "/exit"]),
        (
            ["generate"],
            [*SAMPLING_OPTIONS, "PROMPT", "stdin", "--chat", "bf16", "fp32"],
        ),
        (["chat"], SAMPLING_OPTIONS),
        (["info"], ["--model"]),
        (["logits"], ["--model", "--ids", "--dtype"]),
    ],
    ids=["top", "generate", "chat", "info", "logits"],
)
def test_help_mentions_the_options(cache_env: dict[str, str], command: list[str], options: list[str]) -> None:
    result = run_cli(cache_env, *command, "--help")
    assert result.code == 0, result
    for option in options:
        assert option.lower() in result.out.lower(), (option, result.out)


def test_console_script_runs_as_a_module() -> None:
    done = subprocess.run([sys.executable, "-m", "gemma2", "--help"], capture_output=True, text=True, check=True)
    assert "logits" in done.stdout and "info" in done.stdout


# -- logits --------------------------------------------------------------------------------------


def _top5(model: Gemma2ForCausalLM, ids: list[int]) -> str:
    with torch.no_grad():
        last = model(torch.tensor([ids])).logits[0, -1].float()
    top = last.topk(5)
    return ", ".join(f"{i}:{v:.3f}" for v, i in zip(top.values.tolist(), top.indices.tolist()))


def test_logits_subprocess_agrees_with_the_library(ckpt: Checkpoint, cache_env: dict[str, str]) -> None:
    result = run_cli(cache_env, "logits", "--model", str(ckpt.directory), "--dtype", "fp32", "--ids", "2,5,7")
    assert result.code == 0, result
    assert "input ids: [2, 5, 7]" in result.out
    assert f"last position top-5 (id:logit): {_top5(ckpt.model, [2, 5, 7])}\n" in result.out
    assert re.search(r"logits: shape \[3, 256000\]", result.out)


def test_logits_in_process_main_agrees_with_the_library(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = randomize_(Gemma2ForCausalLM(tiny_config())).eval()
    model.save_pretrained(tmp_path / "m")
    assert main(["logits", "--model", str(tmp_path / "m"), "--dtype", "fp32", "--ids", "2,5,7,9"]) == 0
    captured = capsys.readouterr()
    assert f"last position top-5 (id:logit): {_top5(model, [2, 5, 7, 9])}" in captured.out
    assert "logits: shape [4, 97]" in captured.out
    assert captured.err == ""


def test_in_process_main_reports_errors_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gemma2: error:") and str(tmp_path / "missing") in err and "Traceback" not in err
