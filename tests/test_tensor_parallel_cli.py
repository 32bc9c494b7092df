"""`gemma2 generate` / `chat` under torchrun: one node, two simulated nodes, and bad --tp values."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
PROMPT = "The capital of France is"
GENERATE = ["-m", "gemma2", "generate", "--dtype", "fp32", "--max-new-tokens", "10"]
TIMEOUT = 240


def env() -> dict[str, str]:
    return {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "GEMMA2_DIST_TIMEOUT": "120"}


def run(command: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=TIMEOUT, env=env())


def torchrun(nproc: int, *args: str) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc), *args]


@pytest.fixture(scope="module")
def single() -> str:
    done = run([sys.executable, *GENERATE, PROMPT])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    return done.stdout


def test_generate_under_torchrun_prints_the_single_process_completion_once(single: str) -> None:
    done = run(torchrun(2, *GENERATE, "--tp", "2", PROMPT))
    assert done.returncode == 0, done.stderr
    assert done.stdout == single  # rank 0 prints; rank 1 computes in step and prints nothing


def test_only_rank_0_reads_stdin_and_the_tp_size_defaults_to_the_world(single: str) -> None:
    done = run(torchrun(2, *GENERATE), stdin=PROMPT + "\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == single


def test_chat_under_torchrun_answers_each_line_once() -> None:
    lines = "Hello\nWhat is a module?\n"
    alone = run([sys.executable, "-m", "gemma2", "chat", "--dtype", "fp32", "--max-new-tokens", "6"], stdin=lines)
    assert alone.returncode == 0, alone.stderr
    done = run(torchrun(2, "-m", "gemma2", "chat", "--dtype", "fp32", "--max-new-tokens", "6"), stdin=lines)
    assert done.returncode == 0, done.stderr
    assert done.stdout == alone.stdout
    assert len(done.stdout.splitlines()) >= 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_torchrun_agents_as_two_nodes_give_the_same_completion(single: str) -> None:
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    rendezvous += ["--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "gemma2-test"]
    command = [str(BIN / "torchrun"), *rendezvous, *GENERATE, "--tp", "2", PROMPT]
    agents = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        for _ in range(2)
    ]
    outputs = []
    try:
        for agent in agents:
            out, err = agent.communicate(timeout=TIMEOUT)
            assert agent.returncode == 0, err
            outputs.append(out)
    finally:
        for agent in agents:
            agent.kill()
    # The agent whose worker got rank 0 prints the completion; the other prints nothing.
    assert sorted(outputs) == ["", single]


@pytest.mark.parametrize(
    ("nproc", "tp", "message"),
    [
        (1, "2", "--tp 2 needs 2 processes: run it as torchrun --nproc-per-node 2"),
        (2, "3", "--tp 3 must equal the number of processes torchrun started (2)"),
        (2, "0", "--tp must be an integer >= 1, got 0"),
        (3, "3", "tensor parallel size 3 cannot split the 4 query heads"),
    ],
    ids=["no-torchrun", "not-the-world", "zero", "cannot-split"],
)
def test_bad_tp_values_are_one_line_errors_on_every_rank(nproc: int, tp: str, message: str) -> None:
    command = [sys.executable, *GENERATE, "--tp", tp, PROMPT] if nproc == 1 else torchrun(nproc, *GENERATE, "--tp", tp)
    done = run(command + ([PROMPT] if nproc > 1 else []))
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("gemma2: error:")]
    assert errors and all(message in line for line in errors), done.stderr
    assert len(errors) == nproc  # each rank says it once, and none waits on the others
    # No traceback through our code (torchrun's agent adds its own report of the failed workers).
    assert "gemma2/" not in "".join(line for line in done.stderr.splitlines() if line.lstrip().startswith("File"))
