"""The gemma2 command line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_, tiny_config

from gemma2 import Gemma2ForCausalLM
from gemma2.cli import main


def test_logits_on_the_built_in_demo_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["logits"]) == 0
    out = capsys.readouterr().out
    assert "built a random demo Gemma 2" in out
    shape = re.search(r"logits: shape \[(\d+), (\d+)\]", out)
    assert shape is not None and shape.groups() == ("16", "512")


def test_logits_on_a_checkpoint_agree_with_the_library(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = randomize_(Gemma2ForCausalLM(tiny_config())).eval()
    model.save_pretrained(tmp_path / "m")
    assert main(["logits", "--model", str(tmp_path / "m"), "--ids", "2,5,7,9"]) == 0
    out = capsys.readouterr().out
    with torch.no_grad():
        last = model(torch.tensor([[2, 5, 7, 9]])).logits[0, -1]
    best = int(last.argmax())
    assert re.search(rf"top-5 \(id:logit\): {best}:{last[best]:.3f}", out)


def test_info_describes_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = Gemma2ForCausalLM(tiny_config())
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    assert main(["info", "--model", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert f"parameters: {model.num_parameters():,}" in out
    assert "model-00001-of-" in out and '"query_pre_attn_scalar": 20' in out


def test_errors_are_one_line_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gemma2: error:") and "missing" in err and "Traceback" not in err


def test_console_script_runs_as_a_module() -> None:
    out = subprocess.run([sys.executable, "-m", "gemma2", "--help"], capture_output=True, text=True, check=True)
    assert "logits" in out.stdout and "info" in out.stdout
