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
