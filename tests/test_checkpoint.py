"""Checkpoints: round trips with transformers, dtypes, head changes, bad input, atomic saves.

Directories written by transformers must load into gemma2 with identical outputs, and directories
written by gemma2 must load into transformers the same way. Every malformed checkpoint must raise one
gemma2 error naming what is wrong, and a save that fails midway must leave nothing half-written.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import hf_model, randomize_, save_hf, tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import gemma2
import gemma2.io.checkpoint
from gemma2.io.checkpoint import parse_size

TOL = 1e-5

OURS = {
    "causal": gemma2.Gemma2ForCausalLM,
    "sequence": gemma2.Gemma2ForSequenceClassification,
    "token": gemma2.Gemma2ForTokenClassification,
    "base": gemma2.Gemma2Model,
}
THEIRS = {
    "causal": transformers.Gemma2ForCausalLM,
    "sequence": transformers.Gemma2ForSequenceClassification,
    "token": transformers.Gemma2ForTokenClassification,
    "base": transformers.Gemma2Model,
}
HEADS = list(OURS)

# Shapes that differ from the default tiny config: multi-query (K=1), 1/2/5 layers, other windows.
SHAPES = {
    "tiny": {},
    "mqa-1layer": dict(num_key_value_heads=1, num_hidden_layers=1, sliding_window=3),
    "2layers-wide-window": dict(num_hidden_layers=2, sliding_window=16, num_labels=4),
    "5layers-mha": dict(num_hidden_layers=5, num_key_value_heads=4, sliding_window=2, num_labels=3),
}

# Every head with every shape; sharded ("20KB") and single-file saves alternate so that each head
# and each shape sees both.
ROUND_TRIPS = [
    pytest.param(
        head,
        shape,
        "20KB" if (i + j) % 2 == 0 else None,
        id=f"{head}-{shape}-{'sharded' if (i + j) % 2 == 0 else 'single'}",
    )
    for i, head in enumerate(HEADS)
    for j, shape in enumerate(SHAPES)
]


# ------------------------------------------------------------------------------------------------
# Helpers


def make_inputs(config: gemma2.Gemma2Config, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [3, 9] with no pad token inside the text, and a left-padding mask (rows padded 0, 3, 1)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.vocab_size, (3, 9), generator=generator)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :1] = 0
    ids[mask == 0] = config.pad_token_id
    return ids, mask


def output(model: Any, head: str, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return (out.last_hidden_state if head == "base" else out.logits).float()


def assert_same_outputs(ours: Any, theirs: Any, head: str, config: gemma2.Gemma2Config) -> None:
    ids, mask = make_inputs(config)
    for m in (None, mask):
        a, b = output(ours, head, ids, m), output(theirs, head, ids, m)
        assert a.shape == b.shape
        if head == "sequence":
            assert a.shape == (ids.shape[0], config.num_labels)  # pooled, one row per sequence
        diff = (a - b).abs().max().item()
        assert diff <= TOL, f"{head} outputs differ by {diff} (mask={'yes' if m is not None else 'no'})"


def assert_same_weights(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    common = set(a) & set(b)
    # Everything gemma2 has must exist in transformers' model (it may hold extra buffers).
    assert set(a) <= set(b), sorted(set(a) - set(b))
    for key in sorted(common):
        assert torch.equal(a[key], b[key].to(a[key].dtype)), key


def hf_load(head: str, directory: Path, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = THEIRS[head].from_pretrained(directory, attn_implementation="eager", **kwargs)
    return model.eval()


def ours_random(head: str, config: gemma2.Gemma2Config, seed: int = 0) -> Any:
    model = OURS[head](config)
    randomize_(model, seed=seed)
    return model.eval()


def saved_keys(directory: Path) -> dict[str, str]:
    """Every tensor name in the directory's safetensors files -> the file holding it."""
    out: dict[str, str] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                assert key not in out, f"{key} in two files"
                out[key] = path.name
    return out


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def leftover_tmp(directory: Path) -> list[str]:
    return [
        p.name
        for p in directory.parent.iterdir()
        if p.name.startswith((f".{directory.name}.tmp-", f".{directory.name}.old-"))
    ]


@pytest.fixture
def causal_dir(tmp_path: Path) -> Path:
    """An unsharded float32 transformers Gemma2ForCausalLM checkpoint of the tiny config."""
    return save_hf(hf_model(tiny_config(), "causal"), tmp_path / "causal")


def write_weights(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


# ------------------------------------------------------------------------------------------------
# 1. Round trips with transformers


@pytest.mark.parametrize(("head", "shape", "shard"), ROUND_TRIPS)
def test_transformers_checkpoint_loads_identically(tmp_path: Path, head: str, shape: str, shard: str | None) -> None:
    config = tiny_config(**SHAPES[shape])
    theirs = hf_model(config, head, seed=len(shape))
    directory = save_hf(theirs, tmp_path / "hf", max_shard_size=shard or "5GB")
    assert (directory / "model.safetensors.index.json").exists() == (shard is not None)

    ours = OURS[head].from_pretrained(directory)

    assert isinstance(ours, OURS[head])
    assert not ours.training
    assert ours.dtype == torch.float32
    assert ours.loading_info.newly_initialized == []
    assert ours.loading_info.mismatched == []
    assert ours.config.num_hidden_layers == config.num_hidden_layers
    assert ours.config.num_key_value_heads == config.num_key_value_heads
    assert ours.config.sliding_window == config.sliding_window
    assert all(p.device.type == "cpu" for p in ours.parameters())
    assert_same_weights(ours, theirs)
    assert_same_outputs(ours, theirs, head, config)


@pytest.mark.parametrize(("head", "shape", "shard"), ROUND_TRIPS)
def test_gemma2_checkpoint_loads_identically_in_transformers(
    tmp_path: Path, head: str, shape: str, shard: str | None
) -> None:
    config = tiny_config(**SHAPES[shape])
    ours = ours_random(head, config, seed=len(shape) + 1)
    directory = tmp_path / "ours"
    ours.save_pretrained(directory, max_shard_size=shard or "5GB")

    keys = saved_keys(directory)
    assert "lm_head.weight" not in keys
    assert set(keys) == set(ours.checkpoint_state_dict())
    index = directory / "model.safetensors.index.json"
    if shard is not None:
        assert index.exists()
        assert not (directory / "model.safetensors").exists()
        data = json.loads(index.read_text())
        assert data["weight_map"] == keys  # covers every tensor, each in the shard that holds it
        assert len(set(keys.values())) > 1
        total = sum(t.numel() * t.element_size() for t in ours.checkpoint_state_dict().values())
        assert data["metadata"]["total_size"] == total
    else:
        assert not index.exists()
        assert set(keys.values()) == {"model.safetensors"}
    saved_config = json.loads((directory / "config.json").read_text())
    assert saved_config["architectures"] == [OURS[head].__name__]
    assert saved_config["model_type"] == "gemma2"
    assert saved_config["num_hidden_layers"] == config.num_hidden_layers

    theirs = hf_load(head, directory)
    assert type(theirs) is THEIRS[head]
    assert_same_weights(ours, theirs)
    assert_same_outputs(ours, theirs, head, config)

    # And back again: gemma2 reads its own directory to identical weights.
    again = OURS[head].from_pretrained(directory)
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_causal_save_shares_embedding_and_writes_generation_config(tmp_path: Path) -> None:
    config = tiny_config(num_hidden_layers=2)
    ours = ours_random("causal", config)
    ours.save_pretrained(tmp_path / "c")
    assert "lm_head.weight" not in saved_keys(tmp_path / "c")
    generation = json.loads((tmp_path / "c" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config.eos_token_id
    loaded = gemma2.Gemma2ForCausalLM.from_pretrained(tmp_path / "c")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, ours.model.embed_tokens.weight)
    # Heads without an LM do not write a generation config.
    ours_random("sequence", config).save_pretrained(tmp_path / "s")
    assert not (tmp_path / "s" / "generation_config.json").exists()


@pytest.mark.parametrize("shard", ["20KB", "5GB"])
def test_untied_lm_head_round_trip(tmp_path: Path, shard: str) -> None:
    config = tiny_config(tie_word_embeddings=False, num_hidden_layers=2)
    theirs = hf_model(config, "causal", seed=11)
    ours = gemma2.Gemma2ForCausalLM.from_pretrained(save_hf(theirs, tmp_path / "hf", max_shard_size=shard))
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    assert torch.equal(ours.lm_head.weight, theirs.lm_head.weight)
    assert_same_outputs(ours, theirs, "causal", config)
    ours.save_pretrained(tmp_path / "ours", max_shard_size=shard)
    assert "lm_head.weight" in saved_keys(tmp_path / "ours")
    back = hf_load("causal", tmp_path / "ours")
    assert torch.equal(back.lm_head.weight, theirs.lm_head.weight)
    assert_same_outputs(ours, back, "causal", config)


@pytest.mark.parametrize(("first", "second"), [("20KB", "5GB"), ("5GB", "20KB"), ("20KB", "45KB")])
def test_load_then_save_in_place(tmp_path: Path, first: str, second: str) -> None:
    """Saving over the directory a model was loaded from (files possibly memory-mapped) is safe."""
    config = tiny_config()
    theirs = hf_model(config, "causal", seed=12)
    directory = save_hf(theirs, tmp_path / "m", max_shard_size=first)
    model = gemma2.Gemma2ForCausalLM.from_pretrained(directory)
    model.save_pretrained(directory, max_shard_size=second)
    again = gemma2.Gemma2ForCausalLM.from_pretrained(directory)
    assert_same_weights(again, theirs)
    assert_same_outputs(again, theirs, "causal", config)


def test_pytorch_bin_checkpoint(causal_dir: Path) -> None:
    tensors = load_weights(causal_dir)
    (causal_dir / "model.safetensors").unlink()
    torch.save(tensors, causal_dir / "pytorch_model.bin")
    model = gemma2.Gemma2ForCausalLM.from_pretrained(causal_dir)
    for key, value in tensors.items():
        assert torch.equal(model.state_dict()[key], value), key
    (causal_dir / "pytorch_model.bin").write_bytes(b"garbage" * 10)
    with pytest.raises(gemma2.CheckpointError, match=r"pytorch_model\.bin"):
        gemma2.Gemma2ForCausalLM.from_pretrained(causal_dir)


def test_explicit_config_argument(causal_dir: Path) -> None:
    config = gemma2.Gemma2Config.from_pretrained(causal_dir)
    model = gemma2.Gemma2ForSequenceClassification.from_pretrained(causal_dir, config=config, num_labels=6)
    assert model.config.num_labels == 6
    assert model.score.weight.shape == (6, 32)
    assert config.num_labels == 2  # the caller's config is not modified


def test_sequence_classification_pools_last_non_pad_token_after_loading(tmp_path: Path) -> None:
    config = tiny_config(num_labels=5)
    theirs = hf_model(config, "sequence", seed=3)
    ours = gemma2.Gemma2ForSequenceClassification.from_pretrained(save_hf(theirs, tmp_path / "s", "20KB"))
    ids, mask = make_inputs(config, seed=4)
    with torch.no_grad():
        pooled = ours(input_ids=ids, attention_mask=mask).logits
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        full = ours.score(ours.model(input_ids=ids, attention_mask=mask).last_hidden_state)
    assert pooled.shape == (3, 5)
    assert (pooled - expected).abs().max().item() <= TOL
    assert torch.equal(pooled, full[:, -1])  # left padding: the last position is the last real token


# ------------------------------------------------------------------------------------------------
# 2. dtypes


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.bfloat16, torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("float32", torch.float32),
        (torch.float16, torch.float16),
        (None, torch.float32),
        ("auto", torch.float32),
    ],
)
def test_dtype_on_load(causal_dir: Path, dtype: Any, expected: torch.dtype) -> None:
    reference = gemma2.Gemma2ForCausalLM.from_pretrained(causal_dir)
    model = gemma2.Gemma2ForCausalLM.from_pretrained(causal_dir, dtype=dtype)
    assert model.dtype == expected
    assert {p.dtype for p in model.parameters()} == {expected}
    assert model.config.dtype == str(expected).removeprefix("torch.")
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value.to(expected)), key
    ids, mask = make_inputs(model.config)
    logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.dtype == expected
    assert torch.isfinite(logits).all()


def test_torch_dtype_alias(causal_dir: Path) -> None:
    model = gemma2.Gemma2ForCausalLM.from_pretrained(causal_dir, torch_dtype="bf16")
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("writer", ["gemma2", "transformers"])
def test_bf16_checkpoint_loads_as_bf16_by_default(tmp_path: Path, writer: str) -> None:
    config = tiny_config(num_hidden_layers=2)
    if writer == "gemma2":
        source = ours_random("causal", config).to(torch.bfloat16)
        source.save_pretrained(tmp_path / "bf16", max_shard_size="20KB")
    else:
        source = hf_model(config, "causal").to(torch.bfloat16)
        save_hf(source, tmp_path / "bf16", max_shard_size="20KB")
    with safe_open(str(next((tmp_path / "bf16").glob("*.safetensors"))), framework="pt") as handle:
        assert handle.get_tensor(next(iter(handle.keys()))).dtype == torch.bfloat16
    saved = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert saved.get("dtype", saved.get("torch_dtype")) == "bfloat16"
    model = gemma2.Gemma2ForCausalLM.from_pretrained(tmp_path / "bf16")
    assert model.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert_same_weights(model, source)
    widened = gemma2.Gemma2ForCausalLM.from_pretrained(tmp_path / "bf16", dtype="float32")
    assert widened.dtype == torch.float32
    assert torch.equal(widened.model.norm.weight, source.model.norm.weight.float())


@pytest.mark.parametrize("bad", ["float8", "int8x", "torch.float8", "bfloat15"])
def test_unknown_dtype_string_raises(causal_dir: Path, bad: str) -> None:
    with pytest.raises(gemma2.CheckpointError, match="dtype") as info:
        gemma2.Gemma2ForCausalLM.from_pretrained(causal_dir, dtype=bad)
    assert repr(bad) in str(info.value)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, gemma2.Gemma2Error)


@pytest.mark.parametrize("bad", [torch.int8, torch.int64, torch.bool])
def test_non_floating_dtype_raises(causal_dir: Path, bad: torch.dtype) -> None:
    with pytest.raises(gemma2.CheckpointError) as info:
        gemma2.Gemma2ForCausalLM.from_pretrained(causal_dir, dtype=bad)
    assert str(bad) in str(info.value)


# ------------------------------------------------------------------------------------------------
# 3. Loading into a different head


@pytest.mark.parametrize("num_labels", [1, 3, 7])
def test_causal_checkpoint_into_sequence_classifier(
    causal_dir: Path, num_labels: int, caplog: pytest.LogCaptureFixture
) -> None:
    causal = gemma2.Gemma2ForCausalLM.from_pretrained(causal_dir)
    with caplog.at_level(logging.WARNING, logger="gemma2"):
        model = gemma2.Gemma2ForSequenceClassification.from_pretrained(causal_dir, num_labels=num_labels)
    assert model.loading_info.newly_initialized == ["score.weight"]
    assert model.loading_info.mismatched == []
    assert model.config.num_labels == num_labels
    warnings_ = [r for r in caplog.records if r.name == "gemma2" and r.levelno >= logging.WARNING]
    assert len(warnings_) == 1
    assert "score.weight" in warnings_[0].getMessage()

    score = model.score.weight
    assert score.device.type == "cpu"
    assert score.shape == (num_labels, model.config.hidden_size)
    assert score.dtype == torch.float32
    assert torch.isfinite(score).all()
    std = score.std().item() if score.numel() > 1 else model.config.initializer_range
    assert 0.4 * model.config.initializer_range < std < 2.0 * model.config.initializer_range
    for key, value in causal.model.state_dict().items():
        assert torch.equal(model.model.state_dict()[key], value), key

    ids, mask = make_inputs(model.config)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        hidden = causal.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert logits.shape == (3, num_labels)
    assert torch.allclose(logits, hidden[:, -1] @ score.T, atol=1e-6)


def test_causal_checkpoint_into_token_classifier(causal_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gemma2"):
        model = gemma2.Gemma2ForTokenClassification.from_pretrained(causal_dir, num_labels=3, dtype="bf16")
    assert sorted(model.loading_info.newly_initialized) == ["score.bias", "score.weight"]
    messages = " ".join(r.getMessage() for r in caplog.records if r.name == "gemma2" and r.levelno >= logging.WARNING)
    assert "score.weight" in messages
    assert "score.bias" in messages
    assert model.score.weight.shape == (3, model.config.hidden_size)
    assert model.score.weight.dtype == torch.bfloat16
    assert model.score.bias.dtype == torch.bfloat16
    assert torch.equal(model.score.bias, torch.zeros(3, dtype=torch.bfloat16))
    assert model.score.weight.abs().sum() > 0
    assert not model.training
    ids, mask = make_inputs(model.config)
    out1 = model(input_ids=ids, attention_mask=mask).logits
    out2 = model(input_ids=ids, attention_mask=mask).logits
    assert out1.shape == (3, 9, 3)
    assert torch.equal(out1, out2)  # eval mode: dropout is off


@pytest.mark.parametrize("head", ["sequence", "token"])
def test_classifier_checkpoint_into_causal_lm_ignores_score(tmp_path: Path, head: str) -> None:
    config = tiny_config(num_labels=4)
    source = hf_model(config, head, seed=5)
    directory = save_hf(source, tmp_path / head)
    model = gemma2.Gemma2ForCausalLM.from_pretrained(directory)
    expected_ignored = ["score.weight"] if head == "sequence" else ["score.bias", "score.weight"]
    assert sorted(model.loading_info.ignored) == expected_ignored
    assert model.loading_info.newly_initialized == []
    assert not hasattr(model, "score")
    theirs = hf_load("causal", directory)
    assert_same_weights(model, theirs)
    assert_same_outputs(model, theirs, "causal", config)


def test_sequence_checkpoint_into_token_classifier_and_back(tmp_path: Path) -> None:
    config = tiny_config(num_labels=2)
    seq = hf_model(config, "sequence", seed=6)
    directory = save_hf(seq, tmp_path / "seq")
    token = gemma2.Gemma2ForTokenClassification.from_pretrained(directory)
    # Same shape score.weight is reused; only the bias is new.
    assert token.loading_info.newly_initialized == ["score.bias"]
    assert torch.equal(token.score.weight, seq.score.weight)


@pytest.mark.parametrize("shape", ["tiny", "mqa-1layer", "5layers-mha"])
def test_base_model_from_causal_checkpoint_and_back(tmp_path: Path, shape: str) -> None:
    config = tiny_config(**SHAPES[shape])
    causal_hf = hf_model(config, "causal", seed=7)
    causal_dir = save_hf(causal_hf, tmp_path / "causal", max_shard_size="20KB")

    base = gemma2.Gemma2Model.from_pretrained(causal_dir)
    assert base.loading_info.newly_initialized == []
    assert_same_weights(base, causal_hf.model)
    assert_same_outputs(base, causal_hf.model, "base", config)

    # The backbone saves keys without the "model." prefix, like transformers' Gemma2Model.
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    keys = saved_keys(tmp_path / "base")
    assert "norm.weight" in keys
    assert "embed_tokens.weight" in keys
    assert not any(k.startswith("model.") for k in keys)
    assert json.loads((tmp_path / "base" / "config.json").read_text())["architectures"] == ["Gemma2Model"]

    causal = gemma2.Gemma2ForCausalLM.from_pretrained(tmp_path / "base")
    assert causal.loading_info.newly_initialized == []
    assert causal.lm_head.weight is causal.model.embed_tokens.weight
    assert_same_weights(causal, causal_hf)
    assert_same_outputs(causal, causal_hf, "causal", config)

    # transformers reads the backbone directory gemma2 wrote, too.
    theirs = hf_load("base", tmp_path / "base")
    assert_same_outputs(base, theirs, "base", config)


def test_transformers_base_checkpoint_into_every_head(tmp_path: Path) -> None:
    config = tiny_config(num_labels=3)
    base_hf = hf_model(config, "base", seed=8)
    directory = save_hf(base_hf, tmp_path / "base")
    causal = gemma2.Gemma2ForCausalLM.from_pretrained(directory)
    assert_same_outputs(causal.model, base_hf, "base", config)
    seq = gemma2.Gemma2ForSequenceClassification.from_pretrained(directory)
    assert seq.loading_info.newly_initialized == ["score.weight"]
    assert_same_outputs(seq.model, base_hf, "base", config)


def test_ignore_mismatched_sizes_reinitialises_score(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = tiny_config(num_labels=2)
    source = hf_model(config, "sequence", seed=9)
    directory = save_hf(source, tmp_path / "seq2")

    with pytest.raises(gemma2.CheckpointError) as info:
        gemma2.Gemma2ForSequenceClassification.from_pretrained(directory, num_labels=5)
    message = str(info.value)
    assert "score.weight" in message
    assert "[2, 32]" in message
    assert "[5, 32]" in message
    assert "model.safetensors" in message

    with caplog.at_level(logging.WARNING, logger="gemma2"):
        model = gemma2.Gemma2ForSequenceClassification.from_pretrained(
            directory, num_labels=5, ignore_mismatched_sizes=True
        )
    assert model.loading_info.mismatched == ["score.weight"]
    assert model.loading_info.newly_initialized == ["score.weight"]
    assert "score.weight" in caplog.text
    assert model.score.weight.shape == (5, 32)
    assert model.score.weight.device.type == "cpu"
    assert torch.isfinite(model.score.weight).all()
    assert_same_weights(model.model, source.model)
    assert model(input_ids=make_inputs(model.config)[0]).logits.shape == (3, 5)


def test_ignore_mismatched_sizes_does_not_hide_backbone_mismatch(causal_dir: Path) -> None:
    with pytest.raises(gemma2.CheckpointError, match=r"intermediate|mlp"):
        gemma2.Gemma2ForCausalLM.from_pretrained(causal_dir, intermediate_size=64, ignore_mismatched_sizes=True)


# ------------------------------------------------------------------------------------------------
# 4. Bad input: one clear gemma2 error naming the file, key, shape or value


def raises(error: type[Exception], path: Path | str, *parts: str, cls: type = gemma2.Gemma2ForCausalLM) -> str:
    with pytest.raises(error) as info:
        cls.from_pretrained(path)
    assert isinstance(info.value, gemma2.Gemma2Error)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


def test_missing_config_json(causal_dir: Path) -> None:
    (causal_dir / "config.json").unlink()
    raises(gemma2.ConfigError, causal_dir, str(causal_dir / "config.json"), "not found")


@pytest.mark.parametrize("text", ["{not json", '{"vocab_size": 97,', ""])
def test_corrupt_config_json(causal_dir: Path, text: str) -> None:
    (causal_dir / "config.json").write_text(text)
    raises(gemma2.ConfigError, causal_dir, str(causal_dir / "config.json"), "not valid JSON")


def test_config_json_with_bad_value(causal_dir: Path) -> None:
    data = json.loads((causal_dir / "config.json").read_text())
    data["num_hidden_layers"] = -2
    (causal_dir / "config.json").write_text(json.dumps(data))
    raises(gemma2.ConfigError, causal_dir, "config.json", "num_hidden_layers", "-2")


def test_config_json_not_an_object(causal_dir: Path) -> None:
    (causal_dir / "config.json").write_text("[1, 2]")
    raises(gemma2.ConfigError, causal_dir, "config.json", "JSON object", "list")


def test_config_json_of_another_model_type(causal_dir: Path) -> None:
    data = json.loads((causal_dir / "config.json").read_text())
    data["model_type"] = "llama"
    (causal_dir / "config.json").write_text(json.dumps(data))
    raises(gemma2.ConfigError, causal_dir, "config.json", "'llama'")


def test_directory_without_weights(tmp_path: Path) -> None:
    directory = tmp_path / "empty"
    directory.mkdir()
    tiny_config().save_pretrained(directory)
    raises(gemma2.CheckpointError, directory, str(directory), "no weights found", "model.safetensors")


def test_missing_shard(tmp_path: Path) -> None:
    directory = save_hf(hf_model(tiny_config(), "causal"), tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) > 2
    victim = shards[1]
    victim.unlink()
    raises(gemma2.CheckpointError, directory, victim.name, "missing", "model.safetensors.index.json")


def test_index_names_tensor_its_shard_lacks(tmp_path: Path) -> None:
    config = tiny_config()
    ours_random("causal", config).save_pretrained(tmp_path / "s", max_shard_size="20KB")
    index_path = tmp_path / "s" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]
    key = "model.norm.weight"
    wrong = next(f for f in sorted(set(weight_map.values())) if f != weight_map[key])
    weight_map[key] = wrong
    index_path.write_text(json.dumps(index))
    raises(gemma2.CheckpointError, tmp_path / "s", "'model.norm.weight'", wrong, "lacks")


def test_index_is_not_json(tmp_path: Path) -> None:
    ours_random("causal", tiny_config()).save_pretrained(tmp_path / "s", max_shard_size="20KB")
    (tmp_path / "s" / "model.safetensors.index.json").write_text("{]")
    raises(gemma2.CheckpointError, tmp_path / "s", "model.safetensors.index.json")


@pytest.mark.parametrize("keep", [0.5, 0.99, 12, 4])
def test_truncated_safetensors(causal_dir: Path, keep: float) -> None:
    path = causal_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    raises(gemma2.CheckpointError, causal_dir, str(path))


def test_truncated_shard(tmp_path: Path) -> None:
    directory = save_hf(hf_model(tiny_config(), "causal"), tmp_path / "sharded", max_shard_size="20KB")
    victim = sorted(directory.glob("model-*.safetensors"))[-1]
    victim.write_bytes(victim.read_bytes()[:-100])
    raises(gemma2.CheckpointError, directory, victim.name)


@pytest.mark.parametrize("content", [b"this is not a safetensors file" * 10, b"\x00" * 64, b""])
def test_garbage_model_safetensors(causal_dir: Path, content: bytes) -> None:
    (causal_dir / "model.safetensors").write_bytes(content)
    raises(gemma2.CheckpointError, causal_dir, str(causal_dir / "model.safetensors"))


@pytest.mark.parametrize("field", ["intermediate_size", "hidden_size", "vocab_size"])
def test_config_disagrees_with_tensor_shapes(causal_dir: Path, field: str) -> None:
    data = json.loads((causal_dir / "config.json").read_text())
    old = data[field]
    data[field] = 64
    (causal_dir / "config.json").write_text(json.dumps(data))
    message = raises(gemma2.CheckpointError, causal_dir, "model.safetensors", "shape", "expected")
    assert str(old) in message
    assert "64" in message


def test_wrong_shaped_tensor_in_file(causal_dir: Path) -> None:
    tensors = load_weights(causal_dir)
    key = "model.layers.1.self_attn.k_proj.weight"
    assert tensors[key].shape == (24, 32)
    tensors[key] = torch.zeros(25, 32)
    write_weights(causal_dir, tensors)
    raises(gemma2.CheckpointError, causal_dir, repr(key), "[25, 32]", "[24, 32]", "model.safetensors")


@pytest.mark.parametrize("extra", ["model.layers.9.mlp.up_proj.weight", "foo.bar", "model.layers.0.mlp.extra"])
def test_unknown_extra_key(causal_dir: Path, extra: str) -> None:
    tensors = load_weights(causal_dir)
    tensors[extra] = torch.zeros(4)
    write_weights(causal_dir, tensors)
    raises(gemma2.CheckpointError, causal_dir, repr(extra), "model.safetensors", "unexpected")


def test_checkpoint_with_more_layers_than_config(causal_dir: Path) -> None:
    data = json.loads((causal_dir / "config.json").read_text())
    data["num_hidden_layers"] = 2
    data.pop("layer_types", None)
    (causal_dir / "config.json").write_text(json.dumps(data))
    raises(gemma2.CheckpointError, causal_dir, "model.layers.2.", "2 layers")


@pytest.mark.parametrize(
    "missing", ["model.norm.weight", "model.layers.2.mlp.down_proj.weight", "model.embed_tokens.weight"]
)
def test_missing_key(causal_dir: Path, missing: str) -> None:
    tensors = load_weights(causal_dir)
    del tensors[missing]
    write_weights(causal_dir, tensors)
    raises(gemma2.CheckpointError, causal_dir, repr(missing), "missing", str(causal_dir))


def test_missing_key_in_backbone(causal_dir: Path) -> None:
    tensors = load_weights(causal_dir)
    del tensors["model.layers.0.input_layernorm.weight"]
    write_weights(causal_dir, tensors)
    raises(gemma2.CheckpointError, causal_dir, "layers.0.input_layernorm.weight", "missing", cls=gemma2.Gemma2Model)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_tensor_for_a_float_parameter(causal_dir: Path, dtype: torch.dtype) -> None:
    tensors = load_weights(causal_dir)
    tensors["model.norm.weight"] = torch.ones(32, dtype=dtype)
    write_weights(causal_dir, tensors)
    raises(gemma2.CheckpointError, causal_dir, "'model.norm.weight'", "model.safetensors")


def test_float8_stored_tensor_is_converted(causal_dir: Path) -> None:
    tensors = load_weights(causal_dir)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.float8_e4m3fn)
    write_weights(causal_dir, tensors)
    # Mixed stored dtypes load as float32 by default; an explicit dtype converts every tensor.
    assert gemma2.Gemma2ForCausalLM.from_pretrained(causal_dir).model.norm.weight.dtype == torch.float32
    model = gemma2.Gemma2ForCausalLM.from_pretrained(causal_dir, dtype="bf16")
    assert model.model.norm.weight.dtype == torch.bfloat16


def test_hub_download_failure_is_a_checkpoint_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub

    def offline(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    message = raises(gemma2.CheckpointError, "google/gemma-2-2b", "google/gemma-2-2b", "network unreachable")
    assert "hub" in message


@pytest.mark.parametrize("bad_id", [97, 1000, -1])
def test_input_ids_outside_vocabulary(causal_dir: Path, bad_id: int) -> None:
    model = gemma2.Gemma2ForCausalLM.from_pretrained(causal_dir)
    ids = torch.tensor([[1, 2, bad_id, 3]])
    with pytest.raises(gemma2.InputError) as info:
        model(input_ids=ids)
    assert isinstance(info.value, gemma2.Gemma2Error)
    assert isinstance(info.value, ValueError)
    assert str(bad_id) in str(info.value)
    assert "97" in str(info.value)


def test_nonexistent_local_path(tmp_path: Path) -> None:
    missing = tmp_path / "does" / "not" / "exist"
    raises(gemma2.CheckpointError, missing, str(missing), "no such checkpoint directory")
    raises(gemma2.CheckpointError, "./nothing-here", "nothing-here")


def test_path_is_a_file(causal_dir: Path) -> None:
    raises(gemma2.CheckpointError, causal_dir / "config.json", "config.json", "file")


def test_save_a_meta_model_raises(tmp_path: Path) -> None:
    with torch.device("meta"):
        model = gemma2.Gemma2ForCausalLM(tiny_config())
    with pytest.raises(gemma2.CheckpointError, match="meta"):
        model.save_pretrained(tmp_path / "meta")
    assert not (tmp_path / "meta").exists()


def test_save_over_a_file_raises(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(gemma2.CheckpointError, match="not a directory"):
        ours_random("causal", tiny_config(num_hidden_layers=1)).save_pretrained(target)
    assert target.read_text() == "keep me"
    assert leftover_tmp(target) == []


# ------------------------------------------------------------------------------------------------
# 5. Atomic saves


class _DiskFull(OSError):
    pass


def failing_save_file(monkeypatch: pytest.MonkeyPatch, fail_on_call: int) -> list[str]:
    """Make gemma2's safetensors writer fail on its n-th call (1-based) after writing half a file."""
    real = gemma2.io.checkpoint.save_file
    calls: list[str] = []

    def fake(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
        calls.append(filename)
        if len(calls) == fail_on_call:
            Path(filename).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{partial")
            raise _DiskFull(28, "No space left on device")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(gemma2.io.checkpoint, "save_file", fake)
    return calls


@pytest.mark.parametrize(("shard", "fail_on_call"), [("20KB", 3), ("20KB", 1), ("5GB", 1)])
def test_failed_save_leaves_no_new_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shard: str, fail_on_call: int
) -> None:
    model = ours_random("causal", tiny_config())
    target = tmp_path / "out" / "model"
    calls = failing_save_file(monkeypatch, fail_on_call)
    with pytest.raises(_DiskFull):
        model.save_pretrained(target, max_shard_size=shard)
    assert len(calls) == fail_on_call
    assert not target.exists()
    assert leftover_tmp(target) == []


@pytest.mark.parametrize(("first", "second"), [("20KB", "20KB"), ("5GB", "20KB"), ("20KB", "5GB"), ("30KB", "15KB")])
def test_failed_save_leaves_existing_directory_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str, second: str
) -> None:
    config = tiny_config()
    target = tmp_path / "model"
    ours_random("causal", config, seed=1).save_pretrained(target, max_shard_size=first)
    (target / "tokenizer.json").write_text("{}")
    before = snapshot(target)

    failing_save_file(monkeypatch, 2 if second != "5GB" else 1)
    with pytest.raises(_DiskFull):
        ours_random("causal", config, seed=2).save_pretrained(target, max_shard_size=second)
    assert snapshot(target) == before
    assert leftover_tmp(target) == []
    monkeypatch.undo()
    loaded = gemma2.Gemma2ForCausalLM.from_pretrained(target)
    expected = ours_random("causal", config, seed=1)
    assert torch.equal(loaded.model.norm.weight, expected.model.norm.weight)


def test_failure_after_weights_leaves_existing_directory_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(num_hidden_layers=2)
    target = tmp_path / "model"
    ours_random("causal", config, seed=1).save_pretrained(target)
    before = snapshot(target)
    model = ours_random("causal", config, seed=2)

    def boom() -> Any:
        raise RuntimeError("generation config exploded")

    monkeypatch.setattr(model, "generation_config_dict", boom)
    with pytest.raises(RuntimeError, match="exploded"):
        model.save_pretrained(target, max_shard_size="20KB")
    assert snapshot(target) == before
    assert leftover_tmp(target) == []


@pytest.mark.parametrize("fail_on_call", [1, 2])
@pytest.mark.parametrize(("first", "second"), [("20KB", "5GB"), ("5GB", "20KB"), ("20KB", "20KB")])
def test_failure_while_moving_files_in_leaves_existing_directory_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str, second: str, fail_on_call: int
) -> None:
    """Even when the final move into an existing directory fails, the old checkpoint stays whole."""
    config = tiny_config()
    target = tmp_path / "model"
    ours_random("causal", config, seed=1).save_pretrained(target, max_shard_size=first)
    before = snapshot(target)
    real = gemma2.io.checkpoint.os.rename
    calls: list[str] = []

    def flaky_rename(src: Any, dst: Any) -> None:
        calls.append(str(dst))
        if len(calls) == fail_on_call:
            raise _DiskFull(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(gemma2.io.checkpoint.os, "rename", flaky_rename)
    # A config that differs in a field, so that every file of the new save differs from the old one.
    newer = ours_random("causal", tiny_config(initializer_range=0.03), seed=2)
    with pytest.raises(OSError):
        newer.save_pretrained(target, max_shard_size=second)
    monkeypatch.undo()
    assert calls, "the save never reached the move step"
    assert snapshot(target) == before
    assert leftover_tmp(target) == []


@pytest.mark.parametrize(
    ("first", "second"), [("20KB", "5GB"), ("5GB", "20KB"), ("20KB", "60KB"), ("60KB", "20KB"), ("20KB", "20KB")]
)
def test_resave_removes_stale_shards(tmp_path: Path, first: str, second: str) -> None:
    config = tiny_config()
    target = tmp_path / "model"
    ours_random("causal", config, seed=1).save_pretrained(target, max_shard_size=first)
    (target / "tokenizer.model").write_bytes(b"sentencepiece")
    (target / "README.md").write_text("notes")
    model = ours_random("causal", config, seed=2)
    model.save_pretrained(target, max_shard_size=second)

    names = {p.name for p in target.iterdir()}
    keys = saved_keys(target)
    weight_files = {n for n in names if n.endswith(".safetensors")}
    assert weight_files == set(keys.values())
    if (target / "model.safetensors.index.json").exists():
        weight_map = json.loads((target / "model.safetensors.index.json").read_text())["weight_map"]
        assert set(weight_map.values()) == weight_files
        assert weight_map == keys
        count = len(weight_files)
        assert all(n.endswith(f"-of-{count:05d}.safetensors") for n in weight_files)
    else:
        assert weight_files == {"model.safetensors"}
    assert {"tokenizer.model", "README.md", "config.json", "generation_config.json"} <= names
    assert (target / "tokenizer.model").read_bytes() == b"sentencepiece"
    assert leftover_tmp(target) == []
    loaded = gemma2.Gemma2ForCausalLM.from_pretrained(target)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    theirs = hf_load("causal", target)
    assert_same_outputs(loaded, theirs, "causal", config)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("20KB", 20_000),
        ("1MB", 10**6),
        ("1GiB", 2**30),
        ("5GB", 5 * 10**9),
        ("500kib", 500 * 1024),
        (12345, 12345),
        ("12345", 12345),
        ("1.5MB", 1_500_000),
    ],
)
def test_parse_size(size: Any, expected: int) -> None:
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", [20_000, "20KB", "30000", "1MB", "1GiB", 1, 10**12])
def test_max_shard_size_is_respected(tmp_path: Path, size: Any) -> None:
    model = ours_random("sequence", tiny_config(num_hidden_layers=2))
    model.save_pretrained(tmp_path / "m", max_shard_size=size)
    limit = parse_size(size)
    tensors = model.checkpoint_state_dict()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    files: dict[str, list[str]] = {}
    for key, name in saved_keys(tmp_path / "m").items():
        files.setdefault(name, []).append(key)
    for keys in files.values():
        size_bytes = sum(tensors[k].numel() * tensors[k].element_size() for k in keys)
        assert size_bytes <= limit or len(keys) == 1
    if limit >= total:
        assert list(files) == ["model.safetensors"]
    else:
        assert len(files) > 1
    if limit == 1:
        assert len(files) == len(tensors)  # one tensor per shard
    loaded = gemma2.Gemma2ForSequenceClassification.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.score.weight, model.score.weight)


@pytest.mark.parametrize("size", ["abc", -1, 0, "0KB", "-5MB", "5XB", "", "1.5.3GB"])
def test_invalid_max_shard_size(tmp_path: Path, size: Any) -> None:
    model = ours_random("causal", tiny_config(num_hidden_layers=1))
    with pytest.raises(gemma2.CheckpointError, match="max_shard_size") as info:
        model.save_pretrained(tmp_path / "m", max_shard_size=size)
    assert str(size) in str(info.value)
    assert isinstance(info.value, ValueError)
    assert not (tmp_path / "m").exists()
    assert leftover_tmp(tmp_path / "m") == []


# ------------------------------------------------------------------------------------------------
# 6. Loading does not randomly initialise


def count_init_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[int, ...]]]:
    """Record every torch.nn.init call made on a real (non-meta) tensor."""
    calls: list[tuple[str, tuple[int, ...]]] = []
    for name in ("normal_", "zeros_", "ones_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_"):
        real = getattr(torch.nn.init, name)

        def wrapper(tensor: torch.Tensor, *args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            if tensor.device.type != "meta":
                calls.append((_name, tuple(tensor.shape)))
            return _real(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, wrapper)
    return calls


@pytest.mark.parametrize("head", HEADS)
def test_loading_does_not_randomly_initialise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, head: str) -> None:
    config = tiny_config(num_hidden_layers=2)
    directory = save_hf(hf_model(config, head), tmp_path / head, max_shard_size="20KB")
    calls = count_init_calls(monkeypatch)
    model = OURS[head].from_pretrained(directory)
    assert calls == []
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())


def test_new_head_is_the_only_thing_initialised(causal_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_init_calls(monkeypatch)
    gemma2.Gemma2ForTokenClassification.from_pretrained(causal_dir, num_labels=6)
    assert sorted(calls) == [("normal_", (6, 32)), ("zeros_", (6,))]


# ------------------------------------------------------------------------------------------------
# Slow: a gemma-2-2b shaped checkpoint


@pytest.mark.slow
def test_2b_bf16_checkpoint_loads_fast(tmp_path: Path) -> None:
    config = gemma2.Gemma2Config.from_preset("gemma-2-2b")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in gemma2.Gemma2ForCausalLM(config).checkpoint_state_dict().items()}
    directory = tmp_path / "gemma-2-2b"
    directory.mkdir()
    config.replace(architectures=["Gemma2ForCausalLM"], dtype="bfloat16").save_pretrained(directory)
    # Shards of ~1 GB written one at a time, so the test never holds the whole model twice.
    weight_map: dict[str, str] = {}
    shards: list[list[str]] = [[]]
    used = 0
    for key, shape in shapes.items():
        size = 2 * int(torch.Size(shape).numel())
        if shards[-1] and used + size > 10**9:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {
            k: torch.full(shapes[k], 0.5 if k.endswith("norm.weight") else 0.0, dtype=torch.bfloat16) for k in keys
        }
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    try:
        start = time.perf_counter()
        model = gemma2.Gemma2ForCausalLM.from_pretrained(directory)
        elapsed = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(
            f"gemma-2-2b bf16 from_pretrained: {elapsed:.2f} s, "
            f"peak RSS {peak:.2f} GiB (peak before loading {rss_before:.2f} GiB)"
        )

        assert elapsed < 20, f"loading took {elapsed:.1f} s"
        assert model.dtype == torch.bfloat16
        assert model.loading_info.newly_initialized == []
        assert model.num_parameters() == sum(int(torch.Size(s).numel()) for s in shapes.values())
        assert torch.equal(model.model.norm.weight, torch.full((2304,), 0.5, dtype=torch.bfloat16))
        assert model.lm_head.weight is model.model.embed_tokens.weight
        logits = model(input_ids=torch.tensor([[2, 651, 6037]])).logits
        assert logits.shape == (1, 3, config.vocab_size)
        assert torch.equal(logits, torch.zeros_like(logits))  # zero weights, zero logits
    finally:
        shutil.rmtree(directory, ignore_errors=True)  # 5 GB: do not leave it in pytest's kept tmp dirs
