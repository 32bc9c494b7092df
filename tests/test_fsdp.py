"""FSDP2 fine-tuning on gloo CPU processes: the same step as one process, and a sharded checkpoint that
resumes at another world size."""

from __future__ import annotations

from pathlib import Path

import fsdp_workers
import pytest
import torch
from distributed_ranks import run_ranks


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float) -> None:
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=rtol, atol=rtol * float(tensor.abs().max()), msg=name)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_one_step_at_world_2_on_unequal_halves_is_the_one_process_step(lora: bool) -> None:
    payload = {"steps": 1, "batch": 6, "lora": lora}
    alone = fsdp_workers.trained(payload)
    ranks = run_ranks(fsdp_workers.trained, 2, payload)
    # Rank 0 holds the gathered weights; the loss is the mean over every target of the batch, on both.
    assert_same_weights(ranks[0]["state"], alone["state"], rtol=1e-6)
    for rank in ranks:
        assert rank["loss"] == pytest.approx(alone["loss"], rel=1e-6)
    changed = [n for n, t in alone["state"].items() if not torch.equal(t, alone["initial"][n])]
    assert changed, "the step changed no weight"
    if lora:  # the base weights stay frozen
        assert all("lora_" in name for name in changed), changed


def test_a_checkpoint_saved_at_world_2_resumes_at_world_1(tmp_path: Path) -> None:
    checkpoint = tmp_path / "state"
    run_ranks(fsdp_workers.trained, 2, {"steps": 2, "batch": 4, "save_every": 2, "checkpoint": str(checkpoint)})
    assert (checkpoint / "training_state.dcp").is_dir()
    resumed = fsdp_workers.trained({"steps": 3, "batch": 4, "checkpoint": str(checkpoint), "resume": True})
    straight = fsdp_workers.trained({"steps": 3, "batch": 4})
    assert_same_weights(resumed["state"], straight["state"], rtol=1e-5)


def test_gemma2_train_under_torchrun_writes_one_export_from_rank_0(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from gemma2 import Gemma2ForCausalLM

    data = tmp_path / "docs.txt"
    data.write_text("The os module provides a portable way of using operating system dependent functionality.\n" * 20)
    out = tmp_path / "tuned"
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "gemma2", "train"]
    command += ["--data", str(data), "--out", str(out), "--max-steps", "2", "--batch-size", "2", "--seq-len", "32"]
    command += ["--warmup-steps", "1", "--lr", "1e-3"]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "GEMMA2_DIST_TIMEOUT": "120"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 2 steps") == 1, done.stdout  # rank 0 reports, once
    tuned = Gemma2ForCausalLM.from_pretrained(out)  # a plain Hugging Face checkpoint, with its tokenizer
    assert (out / "tokenizer.json").exists()
    from gemma2.io.default_model import BUNDLED

    base = Gemma2ForCausalLM.from_pretrained(BUNDLED)
    assert tuned.lm_head.weight.data_ptr() == tuned.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
