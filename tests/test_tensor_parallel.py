"""Tensor parallelism on CPU processes joined by gloo: a sharded model computes what one process does."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import tp_workers
from distributed_ranks import run_ranks

from gemma2 import Gemma2Config
from gemma2.distributed import check_size, valid_sizes
from gemma2.errors import InputError

# Tiny, with a window (5) shorter than the prompts (12) and vocabulary / MLP sizes that split by 4.
FIELDS: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    query_pre_attn_scalar=16,
    sliding_window=5,
    max_position_embeddings=64,
)


IDS = torch.tensor([[2, 17, 40, 5, 88, 61, 9, 33, 70, 12, 3, 50]])


def compare(world: int, fields: dict[str, Any]) -> list[dict[str, Any]]:
    reference = tp_workers.behaviour(tp_workers.build(fields, seed=3))
    ranks = run_ranks(tp_workers.sharded_behaviour, world, {"fields": fields, "seed": 3})
    for rank, got in enumerate(ranks):
        for key in ("logits", "decode_logits"):
            torch.testing.assert_close(got[key], reference[key], atol=1e-5, rtol=1e-5, msg=f"rank {rank}: {key}")
        for key in ("greedy", "sampled", "engine"):
            assert got[key] == reference[key], f"rank {rank}: {key} differs from one process"
        assert got["tied"], f"rank {rank}: the LM head no longer aliases the embedding"
        assert got["local_vocab"] == fields["vocab_size"] // world
    return ranks


@pytest.mark.parametrize(
    ("world", "kv_heads"),
    [(2, 2), (4, 2), (4, 1)],
    ids=["tp2", "tp4-kv-replicated-x2", "tp4-one-kv-head"],
)
def test_a_sharded_model_computes_what_one_process_does(world: int, kv_heads: int) -> None:
    ranks = compare(world, {**FIELDS, "num_key_value_heads": kv_heads})
    head_dim = FIELDS["head_dim"]
    # Each rank holds one key/value head when there are fewer of them than ranks, else its share.
    assert {r["local_kv_rows"] for r in ranks} == {max(1, kv_heads // world) * head_dim}
    assert all(r["calls"]["all_reduce"] > 0 and r["calls"]["all_gather"] > 0 for r in ranks)
    # A greedy decode step of two rows gathers one (value, index) pair per row and rank, never the logits.
    for r in ranks:
        assert r["decode_gather_bytes_per_step"] == 2 * 2 * 8 * world


def test_an_argmax_tie_across_a_shard_boundary_goes_to_the_lowest_index() -> None:
    logits = torch.zeros(4, 16)
    logits[0, [3, 12]] = 5.0  # the same top value in the first and the last shard
    logits[1, [7, 8]] = 2.0  # on both sides of the boundary between shards 1 and 2
    logits[2, 15] = 1.0
    logits[3] = -1.0  # every value equal
    expected = logits.argmax(-1).tolist()
    for got in run_ranks(tp_workers.argmax_ties, 4, {"logits": logits}):
        assert got == expected


def test_sizes_that_cannot_split_are_refused_naming_those_that_can() -> None:
    config = Gemma2Config(**{**FIELDS, "vocab_size": 98})
    with pytest.raises(InputError, match=r"tensor parallel size 4 cannot split the vocabulary of 98.*work here: 1, 2$"):
        check_size(config, 4)
    with pytest.raises(InputError, match="the 4 query heads"):
        check_size(Gemma2Config(**FIELDS), 3)
    with pytest.raises(InputError, match="int4 groups of 64"):
        check_size(Gemma2Config(**FIELDS), 2, int4_group=64)
    # The three sizes (GEMMA2.md): the 2B's 4 key/value heads are replicated at TP 8.
    assert valid_sizes(Gemma2Config.from_preset("gemma-2-2b"), limit=16) == [1, 2, 4, 8]
    assert valid_sizes(Gemma2Config.from_preset("gemma-2-9b"), limit=16) == [1, 2, 4, 8, 16]
    assert valid_sizes(Gemma2Config.from_preset("gemma-2-27b"), limit=32) == [1, 2, 4, 8, 16, 32]


QUANTIZABLE = {**FIELDS, "hidden_size": 128, "intermediate_size": 256, "head_dim": 32, "query_pre_attn_scalar": 32}


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_a_sharded_load_reads_its_share_and_quantizes_as_one_process(tmp_path: Any, quantize: str | None) -> None:
    from gemma2 import Gemma2ForCausalLM

    world, group = 2, 64 if quantize == "int4" else None  # o_proj's 128 inputs: 64 per rank
    tp_workers.build(QUANTIZABLE, seed=5).save_pretrained(tmp_path)
    whole = tp_workers.loaded_view(
        Gemma2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, quantize=quantize, group_size=group), IDS
    )
    payload = {"path": str(tmp_path), "ids": IDS, "quantize": quantize, "group": group}
    ranks = run_ranks(tp_workers.load_sharded, world, payload)
    for rank, got in enumerate(ranks):
        torch.testing.assert_close(got["logits"], whole["logits"], atol=1e-4, rtol=1e-4, msg=f"rank {rank}")
        # Every split tensor is halved; the norms (replicated) are a sliver of this model's bytes.
        assert 0.49 < got["bytes_read"] / whole["bytes_read"] < 0.52, (rank, got["bytes_read"], whole["bytes_read"])
    # The ranks' slices put together are the one-process weights (and int8 / int4 scales), bit for bit.
    for name, dim in (("q", 0), ("o", 1), ("down", 1)):
        joined = torch.cat([r["weights"][name] for r in ranks], dim=dim)
        assert torch.equal(joined, whole["weights"][name]), name
        if name in whole["scales"]:
            scales = [r["scales"][name] for r in ranks]
            expected = whole["scales"][name]
            joined_scale = scales[0] if expected.dim() == 1 and dim == 1 else torch.cat(scales, dim=dim)
            assert torch.equal(joined_scale, expected), f"{name} scales"


def test_info_shows_what_each_rank_holds(capsys: pytest.CaptureFixture[str]) -> None:
    from gemma2.cli import main

    assert main(["info", "--tp", "2"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("tensor parallel 2"))
    assert "per rank" in line and "2 query and 1 key/value heads per rank" in line
    assert main(["info", "--tp", "4"]) == 0  # the demo model's 2 key/value heads, each on 2 ranks
    assert "each key/value head on 2 ranks" in capsys.readouterr().out
    assert main(["info", "--tp", "3"]) == 2
    assert "tensor parallel size 3 cannot split the 4 query heads" in capsys.readouterr().err
