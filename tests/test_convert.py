"""gemma2 convert: Google's original Gemma 2 checkpoints (PyTorch, Flax/Orbax) -> Hugging Face directories.

The test checkpoints are built here from GEMMA2.md section 5 alone, never from the converter's own
layout code: a random transformers model gives the Hugging Face state dict (and is the numerical
oracle); the builders below turn it into the original PyTorch layout (embedder.weight, fused qkv_proj,
freqs_cis) and the Flax/Orbax layout (einsum kernels, padded embedding, 2B or 9B/27B gating). The
converted directory must hold exactly the tensors the builders started from, load in gemma2 and in
transformers, and give the oracle's logits. Bad input must raise one gemma2 error naming the file
and the tensor or field, and leave nothing behind.

Peak-memory figures are printed; run with `pytest -s` to see them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from conftest import hf_model, save_hf, tiny_config
from safetensors import safe_open

import gemma2
from gemma2 import CheckpointError, ConfigError, Gemma2Config, Gemma2Error
from gemma2.convert import ConversionSummary, convert_checkpoint
from gemma2.io.assets import gemma_tokenizer_model

GEMMA2 = Path(sys.executable).parent / "gemma2"
TOL = 1e-5
NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
FLAX_NORMS = dict(zip(("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"), NORMS))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Tiny shapes (each with d != F, so the two Flax gating layouts cannot be confused):
SHAPES: dict[str, dict[str, Any]] = {
    # conftest's TINY: GQA (H=4, K=2), H*D != d, query_pre_attn_scalar 20 != head_dim 12, 3 layers.
    "gqa": {},
    # like 27B: the scalar is d/H-like (144), not head_dim (8); a wider MLP.
    "27b-style": dict(head_dim=8, query_pre_attn_scalar=144, intermediate_size=64, num_hidden_layers=2),
    # multi-query attention: one key/value head.
    "mqa": dict(num_key_value_heads=1, num_hidden_layers=2),
}


# ------------------------------------------------------------------------------------------------
# The Hugging Face state (the oracle's) and the builders of the original layouts (GEMMA2.md section 5)


def hf_state(config: Gemma2Config, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random transformers model's state dict (tied lm_head left out), rounded to `dtype`."""
    model = hf_model(config, seed=seed)
    return {k: v.detach().to(dtype).clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def freqs_cis(config: Gemma2Config) -> torch.Tensor:
    """gemma_pytorch's rotary buffer (complex64 [2 * max_positions, D / 2]), saved with the weights."""
    dim = config.head_dim
    inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    angles = torch.outer(torch.arange(config.max_position_embeddings * 2).float(), inv)
    return torch.polar(torch.ones_like(angles), angles)


def to_pytorch_original(state: dict[str, torch.Tensor], config: Gemma2Config) -> dict[str, torch.Tensor]:
    """HF keys -> gemma_pytorch keys: embedder.weight, fused qkv_proj (rows q | k | v), freqs_cis."""
    out = {"embedder.weight": state["model.embed_tokens.weight"]}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = [state[f"{p}self_attn.{n}_proj.weight"] for n in "qkv"]
        out[f"{p}self_attn.qkv_proj.weight"] = torch.cat(attn, dim=0)
        out[f"{p}self_attn.o_proj.weight"] = state[f"{p}self_attn.o_proj.weight"]
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[f"{p}mlp.{name}.weight"] = state[f"{p}mlp.{name}.weight"]
        for name in NORMS:
            out[f"{p}{name}.weight"] = state[f"{p}{name}.weight"]
    out["model.norm.weight"] = state["model.norm.weight"]
    out["freqs_cis"] = freqs_cis(config)
    return out


def from_pytorch_original(original: dict[str, torch.Tensor], config: Gemma2Config) -> dict[str, torch.Tensor]:
    """The inverse of to_pytorch_original (for checkpoints built directly in the original layout)."""
    h, k, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    state = {"model.embed_tokens.weight": original["embedder.weight"]}
    for key, tensor in original.items():
        if key.endswith("qkv_proj.weight"):
            prefix = key.removesuffix("qkv_proj.weight")
            q, kk, v = torch.split(tensor, [h * d, k * d, k * d], dim=0)
            state.update({f"{prefix}q_proj.weight": q, f"{prefix}k_proj.weight": kk, f"{prefix}v_proj.weight": v})
        elif key.startswith("model."):
            state[key] = tensor
    return state


def write_pytorch(directory: Path, original: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.ckpt"
    torch.save({"model_state_dict": original}, path)
    return path


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy copy: bf16 as ml_dtypes.bfloat16 (the same bits), other dtypes as themselves."""
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return tensor.numpy().copy()


def to_flax_tree(
    state: dict[str, torch.Tensor], config: Gemma2Config, gating: str, rows: int = 128
) -> dict[str, dict[str, np.ndarray]]:
    """HF state -> Google's flat Orbax tree ("transformer/layer_0/attn/q_einsum": {"w": ...}).

    gating "2b": gating_einsum [2, d, F] (gate.T, up.T); "9b" (and 27B): [2, F, d] (gate, up).
    The embedding is padded with random rows to `rows` (as 256000 -> 256128).
    """
    h, k, dim, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
    embed = state["model.embed_tokens.weight"]
    padding = torch.randn(rows - embed.shape[0], d, generator=torch.Generator().manual_seed(7)).to(embed.dtype)
    tree = {
        "transformer/embedder": {"input_embedding": to_numpy(torch.cat([embed, padding]))},
        "transformer/final_norm": {"scale": to_numpy(state["model.norm.weight"])},
    }
    for i in range(config.num_hidden_layers):
        p, f = f"model.layers.{i}.", f"transformer/layer_{i}/"
        q = state[f"{p}self_attn.q_proj.weight"].reshape(h, dim, d).permute(0, 2, 1)  # [H, d, D]
        kk = state[f"{p}self_attn.k_proj.weight"].reshape(k, dim, d).permute(0, 2, 1)  # [K, d, D]
        v = state[f"{p}self_attn.v_proj.weight"].reshape(k, dim, d).permute(0, 2, 1)
        o = state[f"{p}self_attn.o_proj.weight"].T.reshape(h, dim, d)  # [H, D, d]
        gate, up = state[f"{p}mlp.gate_proj.weight"], state[f"{p}mlp.up_proj.weight"]  # [F, d]
        gating_w = torch.stack([gate.T, up.T]) if gating == "2b" else torch.stack([gate, up])
        tree[f"{f}attn/q_einsum"] = {"w": to_numpy(q)}
        tree[f"{f}attn/kv_einsum"] = {"w": to_numpy(torch.stack([kk, v]))}
        tree[f"{f}attn/attn_vec_einsum"] = {"w": to_numpy(o)}
        tree[f"{f}mlp/gating_einsum"] = {"w": to_numpy(gating_w)}
        tree[f"{f}mlp/linear"] = {"w": to_numpy(state[f"{p}mlp.down_proj.weight"].T)}  # [F, d]
        for flax_name, hf_name in FLAX_NORMS.items():
            tree[f"{f}{flax_name}"] = {"scale": to_numpy(state[f"{p}{hf_name}.weight"])}
    return tree


def write_flax(path: Path, tree: dict[str, dict[str, np.ndarray]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ocp.PyTreeCheckpointer().save(path, tree)
    return path


def write_config(directory: Path, config: Gemma2Config) -> Path:
    config.save_pretrained(directory)
    return directory / "config.json"


# ------------------------------------------------------------------------------------------------
# Checks of a converted directory


def converted_tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                assert key not in tensors, f"{key} is in two shards"
                tensors[key] = handle.get_tensor(key)
    return tensors


def assert_same_tensors(out: Path, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    got = converted_tensors(out)
    assert set(got) == set(state), f"missing {set(state) - set(got)}, extra {set(got) - set(state)}"
    for key, expected in state.items():
        assert got[key].dtype == dtype, f"{key}: stored {got[key].dtype}, expected {dtype}"
        assert torch.equal(got[key], expected.to(dtype)), f"{key} differs from the tensor it came from"


def input_ids(config: Gemma2Config) -> torch.Tensor:
    """Longer than the sliding window, so both layer kinds are exercised."""
    return torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))


def oracle_logits(config: Gemma2Config, state: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    model = hf_model(config)
    weights = {k: v.float() for k, v in state.items()}
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        return model(ids).logits


def assert_same_logits(out: Path, config: Gemma2Config, state: dict[str, torch.Tensor]) -> None:
    """The converted directory, in gemma2 and in transformers (fp32), gives the oracle's logits."""
    ids = input_ids(config)
    expected = oracle_logits(config, state, ids)
    ours = gemma2.Gemma2ForCausalLM.from_pretrained(out, dtype=torch.float32)
    theirs = transformers.Gemma2ForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        ours_logits = ours(ids).logits
        theirs_logits = theirs.eval()(ids).logits
    assert ours_logits.shape == expected.shape == theirs_logits.shape
    assert (ours_logits - expected).abs().max().item() <= TOL
    assert (theirs_logits - expected).abs().max().item() <= TOL
    assert (ours_logits - theirs_logits).abs().max().item() <= TOL


def assert_hf_directory(
    out: Path, config: Gemma2Config, dtype: torch.dtype, summary: ConversionSummary, fmt: str, instruct: bool = False
) -> None:
    written = json.loads((out / "config.json").read_text())
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "query_pre_attn_scalar",
        "sliding_window",
    ):
        assert written[field] == getattr(config, field), field
    assert written["model_type"] == "gemma2"
    assert written["architectures"] == ["Gemma2ForCausalLM"]
    name = str(dtype).removeprefix("torch.")
    assert written.get("dtype", written.get("torch_dtype")) == name
    assert written.get("torch_dtype", name) == name
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ([1, 107] if instruct else 1)
    assert not list(out.parent.glob(f".{out.name}*")), "a temporary directory was left beside the output"

    tensors = converted_tensors(out)
    parameters = sum(t.numel() for t in tensors.values())
    assert summary.out == out
    assert summary.format == fmt
    assert summary.parameters == parameters
    assert summary.dtype == name
    assert summary.bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert summary.shards == len(list(out.glob("*.safetensors")))
    assert summary.seconds > 0
    line = summary.line()
    assert "\n" not in line
    assert f"{parameters:,}" in line or str(parameters) in line
    assert name in line and summary.variant in line


def nothing_left(out: Path) -> None:
    """After a failed conversion: no output and no temporary directory beside it."""
    assert not out.exists(), f"{out} was left behind"
    leftovers = [p.name for p in out.parent.iterdir()] if out.parent.exists() else []
    assert leftovers == [], f"left beside the output: {leftovers}"


# ------------------------------------------------------------------------------------------------
# Round trips: every converted tensor is the one it came from; same logits in gemma2 and transformers


@pytest.mark.parametrize(
    "shape, dtype",
    [("gqa", "float32"), ("gqa", "bfloat16"), ("27b-style", "bfloat16"), ("mqa", "float32")],
)
def test_pytorch_checkpoint_converts_exactly(tmp_path: Path, shape: str, dtype: str) -> None:
    config = tiny_config(**SHAPES[shape])
    state = hf_state(config, DTYPES[dtype])
    source = write_pytorch(tmp_path / "src", to_pytorch_original(state, config))
    out = tmp_path / "outs" / "hf"
    summary = convert_checkpoint(
        source, out, config=write_config(tmp_path / "cfg", config), format="pytorch", progress=False
    )
    assert_same_tensors(out, state, DTYPES[dtype])
    assert_hf_directory(out, config, DTYPES[dtype], summary, "pytorch")
    assert_same_logits(out, config, state)
    if shape == "27b-style":
        assert json.loads((out / "config.json").read_text())["query_pre_attn_scalar"] == 144


@pytest.mark.parametrize(
    "shape, gating, dtype",
    [
        ("gqa", "2b", "bfloat16"),
        ("gqa", "9b", "float32"),
        ("27b-style", "9b", "bfloat16"),
        ("mqa", "2b", "float32"),
    ],
)
def test_flax_checkpoint_converts_exactly(tmp_path: Path, shape: str, gating: str, dtype: str) -> None:
    config = tiny_config(**SHAPES[shape])
    state = hf_state(config, DTYPES[dtype])
    tree = to_flax_tree(state, config, gating)
    assert tree["transformer/embedder"]["input_embedding"].shape == (128, config.hidden_size)
    source = write_flax(tmp_path / "src" / "checkpoint", tree)
    out = tmp_path / "outs" / "hf"
    summary = convert_checkpoint(source, out, config=write_config(tmp_path / "cfg", config), progress=False)
    assert_same_tensors(out, state, DTYPES[dtype])  # the embedding's padding rows are cut
    assert_hf_directory(out, config, DTYPES[dtype], summary, "flax")
    assert_same_logits(out, config, state)
    if shape == "27b-style":
        assert json.loads((out / "config.json").read_text())["query_pre_attn_scalar"] == 144


@pytest.mark.parametrize(
    "fmt, source_dtype, target",
    [
        ("pytorch", "float32", "float16"),
        ("pytorch", "float32", "bfloat16"),
        ("pytorch", "bfloat16", "float32"),
        ("flax", "bfloat16", "float16"),
        ("flax", "float32", "bfloat16"),
    ],
)
def test_dtype_sets_the_stored_dtype(tmp_path: Path, fmt: str, source_dtype: str, target: str) -> None:
    config = tiny_config(num_hidden_layers=2)
    state = hf_state(config, DTYPES[source_dtype])
    if fmt == "pytorch":
        source = write_pytorch(tmp_path / "src", to_pytorch_original(state, config))
    else:
        source = write_flax(tmp_path / "src" / "ckpt", to_flax_tree(state, config, "9b"))
    out = tmp_path / "outs" / "hf"
    summary = convert_checkpoint(
        source, out, config=write_config(tmp_path / "cfg", config), dtype=target, progress=False
    )
    expected = {k: v.to(DTYPES[target]) for k, v in state.items()}
    assert_same_tensors(out, expected, DTYPES[target])
    assert_hf_directory(out, config, DTYPES[target], summary, fmt)
    assert_same_logits(out, config, expected)
    # config.json's dtype is what is stored: both libraries load that dtype by default
    assert gemma2.Gemma2ForCausalLM.from_pretrained(out).model.embed_tokens.weight.dtype == DTYPES[target]
    theirs = transformers.Gemma2ForCausalLM.from_pretrained(out, attn_implementation="eager", dtype="auto")
    assert theirs.dtype == DTYPES[target]


def test_sharded_output_with_index(tmp_path: Path) -> None:
    config = tiny_config()
    state = hf_state(config, torch.float32)
    source = write_pytorch(tmp_path / "src", to_pytorch_original(state, config))
    out = tmp_path / "outs" / "hf"
    summary = convert_checkpoint(
        source, out, config=write_config(tmp_path / "cfg", config), max_shard_size="20KB", progress=False
    )
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and summary.shards == len(shards)
    assert shards == [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as handle:
            keys = list(handle.keys())
            sizes = [handle.get_slice(k).get_shape() for k in keys]
            assert all(index["weight_map"][k] == shard for k in keys)
        nbytes = sum(int(np.prod(s)) * 4 for s in sizes)
        assert nbytes <= 20_000 or len(keys) == 1, f"{shard} holds {nbytes} bytes"
    assert_same_tensors(out, state, torch.float32)
    assert_hf_directory(out, config, torch.float32, summary, "pytorch")
    assert_same_logits(out, config, state)


def test_directory_of_bin_shards_with_index(tmp_path: Path) -> None:
    config = tiny_config()
    state = hf_state(config, torch.bfloat16, seed=3)
    original = to_pytorch_original(state, config)
    keys = list(original)
    parts = [
        dict((k, original[k]) for k in keys[: len(keys) // 2]),
        dict((k, original[k]) for k in keys[len(keys) // 2 :]),
    ]
    source = tmp_path / "src"
    source.mkdir()
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save(part, source / name)
        weight_map.update({k: name for k in part})
    (source / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "outs" / "hf"
    summary = convert_checkpoint(source, out, config=write_config(tmp_path / "cfg", config), progress=False)
    assert_same_tensors(out, state, torch.bfloat16)
    assert_hf_directory(out, config, torch.bfloat16, summary, "pytorch")
    assert_same_logits(out, config, state)


def int8_original(config: Gemma2Config, seed: int = 5) -> dict[str, torch.Tensor]:
    """A gemma_pytorch int8 checkpoint: int8 matrices with one fp32 `weight_scaler` per output row."""
    generator = torch.Generator().manual_seed(seed)
    floats = to_pytorch_original(hf_state(config, torch.float32, seed=seed), config)
    original: dict[str, torch.Tensor] = {}
    for key, tensor in floats.items():
        if tensor.dim() == 2 and key.endswith(".weight"):
            original[key] = torch.randint(-127, 128, tensor.shape, generator=generator, dtype=torch.int8)
            original[key.removesuffix(".weight") + ".weight_scaler"] = (
                torch.rand(tensor.shape[0], generator=generator) * 0.01 + 1e-3
            )
        else:
            original[key] = tensor
    return original


def test_int8_checkpoint_is_dequantized(tmp_path: Path) -> None:
    config = tiny_config()
    original = int8_original(config)
    assert original["model.layers.0.self_attn.qkv_proj.weight"].dtype == torch.int8
    dequantized = {
        k: (v.float() * original[k.removesuffix(".weight") + ".weight_scaler"][:, None] if v.dtype == torch.int8 else v)
        for k, v in original.items()
        if not k.endswith("weight_scaler")
    }
    state = from_pytorch_original(dequantized, config)
    source = write_pytorch(tmp_path / "src", original)
    out = tmp_path / "outs" / "hf"
    summary = convert_checkpoint(source, out, config=write_config(tmp_path / "cfg", config), progress=False)
    assert_same_tensors(out, state, torch.float32)
    assert_hf_directory(out, config, torch.float32, summary, "pytorch")
    assert_same_logits(out, config, state)


# ------------------------------------------------------------------------------------------------
# Tokenizer files, instruct generation config


TOKENIZER_MODEL = dict(
    vocab_size=256000,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    query_pre_attn_scalar=8,
)


def test_tokenizer_files_and_instruct(tmp_path: Path) -> None:
    config = tiny_config(**TOKENIZER_MODEL)
    state = hf_state(config, torch.bfloat16)
    source = write_pytorch(tmp_path / "src", to_pytorch_original(state, config))
    out = tmp_path / "outs" / "hf"
    tokenizer_model = gemma_tokenizer_model()
    summary = convert_checkpoint(
        source,
        out,
        config=write_config(tmp_path / "cfg", config),
        tokenizer=tokenizer_model,
        instruct=True,
        progress=False,
    )
    assert_same_tensors(out, state, torch.bfloat16)
    assert_hf_directory(out, config, torch.bfloat16, summary, "pytorch", instruct=True)
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == [1, 107]
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).is_file(), name
    assert (out / "tokenizer.model").read_bytes() == tokenizer_model.read_bytes()
    template = json.loads((out / "tokenizer_config.json").read_text()).get("chat_template")
    assert isinstance(template, str) and "<start_of_turn>" in template
    special = json.loads((out / "special_tokens_map.json").read_text())
    assert {"bos_token", "eos_token", "pad_token"} <= set(special)

    ours = gemma2.Gemma2Tokenizer.from_pretrained(out)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    text = "Hello world, convert me: 12345 ünïcode"
    assert ours.encode(text) == theirs.encode(text) and ours.encode(text)[0] == 2
    chat = [{"role": "user", "content": "Hi there"}]
    ours_chat = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    theirs_chat = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ours_chat == theirs_chat and "<start_of_turn>model\n" in ours_chat
    model = gemma2.Gemma2ForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.generation_config["eos_token_id"] == [1, 107]
    # The converted directory runs in `gemma2 generate` as it does in the library.
    expected = "".join(gemma2.stream(model, ours, [{"role": "user", "content": "Hi there"}], max_new_tokens=5))
    result = run_cli("generate", "--model", out, "--chat", "--max-new-tokens", "5", "--dtype", "fp32", "Hi there")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


# ------------------------------------------------------------------------------------------------
# Variant and format detection


def test_tiny_pytorch_checkpoint_without_config_fits_no_official_variant(tmp_path: Path) -> None:
    config = tiny_config()
    source = write_pytorch(tmp_path / "src", to_pytorch_original(hf_state(config), config))
    out = tmp_path / "outs" / "hf"
    with pytest.raises(CheckpointError) as error:
        convert_checkpoint(source, out, progress=False)
    message = str(error.value)
    assert "fit no official" in message and str(source.parent) in message
    assert "32" in message and "3" in message  # the shapes it found (d=32, 3 layers)
    nothing_left(out)


def test_tiny_flax_checkpoint_without_config_fits_no_official_variant(tmp_path: Path) -> None:
    config = tiny_config()
    source = write_flax(tmp_path / "src" / "ckpt", to_flax_tree(hf_state(config, torch.bfloat16), config, "2b"))
    out = tmp_path / "outs" / "hf"
    with pytest.raises(CheckpointError) as error:
        convert_checkpoint(source, out, progress=False)
    message = str(error.value)
    assert "fit no official" in message and str(source) in message and "32" in message
    nothing_left(out)


@pytest.mark.parametrize("with_config", [False, True], ids=["no-config", "with-config"])
def test_variant_that_disagrees_with_the_shapes(tmp_path: Path, with_config: bool) -> None:
    config = tiny_config()
    source = write_pytorch(tmp_path / "src", to_pytorch_original(hf_state(config), config))
    out = tmp_path / "outs" / "hf"
    cfg = write_config(tmp_path / "cfg", config) if with_config else None
    with pytest.raises(Gemma2Error) as error:
        convert_checkpoint(source, out, variant="9b", config=cfg, progress=False)
    assert "9b" in str(error.value) and str(source.parent) in str(error.value)
    nothing_left(out)


def test_format_that_disagrees_with_the_files(tmp_path: Path) -> None:
    config = tiny_config(num_hidden_layers=1)
    state = hf_state(config, torch.bfloat16)
    cfg = write_config(tmp_path / "cfg", config)
    pytorch_source = write_pytorch(tmp_path / "pt", to_pytorch_original(state, config))
    flax_source = write_flax(tmp_path / "flax" / "ckpt", to_flax_tree(state, config, "2b"))
    out = tmp_path / "outs" / "hf"
    for source, wrong in ((pytorch_source, "flax"), (flax_source, "pytorch")):
        with pytest.raises(CheckpointError) as error:
            convert_checkpoint(source, out, format=wrong, config=cfg, progress=False)
        assert wrong in str(error.value) and str(source) in str(error.value)
        nothing_left(out)
    # the right format is accepted
    convert_checkpoint(flax_source, out, format="flax", config=cfg, progress=False)
    assert_same_tensors(out, state, torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# Bad input: one clear gemma2 error naming the file and the tensor or field; nothing left at out

BadCase = Callable[[Path], tuple[Path, dict[str, Any], list[str]]]
BAD: dict[str, BadCase] = {}


def bad(name: str) -> Callable[[BadCase], BadCase]:
    def register(function: BadCase) -> BadCase:
        BAD[name] = function
        return function

    return register


def _tiny_original(tmp: Path, **shape: Any) -> tuple[Gemma2Config, dict[str, torch.Tensor], Path]:
    config = tiny_config(**shape)
    return config, to_pytorch_original(hf_state(config), config), write_config(tmp / "cfg", config)


@bad("random-file")
def _random_file(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    path = tmp / "notes.txt"
    path.write_text("not a checkpoint\n")
    return path, {}, [str(path)]


@bad("garbage-model.ckpt")
def _garbage_ckpt(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    path = tmp / "src" / "model.ckpt"
    path.parent.mkdir()
    path.write_bytes(np.random.default_rng(0).bytes(10_000))
    return path, {}, [str(path)]


@bad("truncated-model.ckpt")
def _truncated_ckpt(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    _, original, cfg = _tiny_original(tmp)
    path = write_pytorch(tmp / "src", original)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, {"config": cfg}, [str(path)]


@bad("empty-directory")
def _empty_dir(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    path = tmp / "src"
    path.mkdir()
    return path, {}, [str(path)]


@bad("hugging-face-directory")
def _hf_dir(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    path = save_hf(hf_model(tiny_config()), tmp / "src")
    return path, {}, [str(path)]


@bad("dict-without-tensors")
def _no_tensors(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    path = tmp / "src" / "model.ckpt"
    path.parent.mkdir()
    torch.save({"model_state_dict": {"embedder.weight": [1, 2, 3]}}, path)
    return path, {}, [str(path), "embedder.weight"]


@bad("gemma1-pytorch")
def _gemma1(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    _, original, cfg = _tiny_original(tmp)
    original = {k: v for k, v in original.items() if "feedforward_layernorm" not in k}
    path = write_pytorch(tmp / "src", original)
    return path, {"config": cfg}, [str(path), "Gemma 1", "feed-forward norm"]


@bad("gemma1-flax")
def _gemma1_flax(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    config = tiny_config()
    tree = to_flax_tree(hf_state(config), config, "9b")
    # Gemma 1's Flax layers have pre_attention_norm and pre_ffw_norm only
    tree = {k: v for k, v in tree.items() if not k.endswith(("post_attention_norm", "post_ffw_norm"))}
    path = write_flax(tmp / "src" / "ckpt", tree)
    return path, {"config": write_config(tmp / "cfg", config)}, [str(path), "Gemma 1"]


@bad("gemma3-pytorch")
def _gemma3(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    config, original, cfg = _tiny_original(tmp)
    for i in range(config.num_hidden_layers):
        original[f"model.layers.{i}.self_attn.query_norm.weight"] = torch.ones(config.head_dim)
        original[f"model.layers.{i}.self_attn.key_norm.weight"] = torch.ones(config.head_dim)
    path = write_pytorch(tmp / "src", original)
    return path, {"config": cfg}, [str(path), "Gemma 3", "query"]


@bad("gemma3-flax")
def _gemma3_flax(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    config = tiny_config()
    tree = to_flax_tree(hf_state(config), config, "9b")
    for i in range(config.num_hidden_layers):
        tree[f"transformer/layer_{i}/attn/_query_norm"] = {"scale": np.ones(config.head_dim, np.float32)}
        tree[f"transformer/layer_{i}/attn/_key_norm"] = {"scale": np.ones(config.head_dim, np.float32)}
    path = write_flax(tmp / "src" / "ckpt", tree)
    return path, {"config": write_config(tmp / "cfg", config)}, [str(path), "Gemma 3", "query"]


@bad("llama-meta")
def _llama_meta(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    d = 32
    original = {
        "tok_embeddings.weight": torch.randn(97, d),
        "norm.weight": torch.ones(d),
        "output.weight": torch.randn(97, d),
    }
    for i in range(2):
        for name in ("wq", "wk", "wv", "wo"):
            original[f"layers.{i}.attention.{name}.weight"] = torch.randn(d, d)
        for name in ("w1", "w2", "w3"):
            original[f"layers.{i}.feed_forward.{name}.weight"] = torch.randn(d, d)
        original[f"layers.{i}.attention_norm.weight"] = torch.ones(d)
        original[f"layers.{i}.ffn_norm.weight"] = torch.ones(d)
    path = tmp / "src" / "consolidated.00.pth"
    path.parent.mkdir()
    torch.save(original, path)
    return path, {}, [str(path), "embedder.weight"]


@bad("llama-hf-keys")
def _llama_hf(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    config = tiny_config()
    state = hf_state(config)
    state = {k: v for k, v in state.items() if "feedforward_layernorm" not in k}  # Llama has two norms a layer
    path = write_pytorch(tmp / "src", state)
    return path, {"config": write_config(tmp / "cfg", config)}, [str(path), "qkv_proj"]


@bad("missing-tensor-pytorch")
def _missing(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    _, original, cfg = _tiny_original(tmp)
    del original["model.layers.1.mlp.down_proj.weight"]
    path = write_pytorch(tmp / "src", original)
    return path, {"config": cfg}, [str(path), "model.layers.1.mlp.down_proj.weight"]


@bad("extra-tensor-pytorch")
def _extra(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    _, original, cfg = _tiny_original(tmp)
    original["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(6)
    path = write_pytorch(tmp / "src", original)
    return path, {"config": cfg}, [str(path), "model.layers.0.self_attn.rotary_emb.inv_freq"]


@bad("config-has-fewer-layers")
def _extra_layer(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    four = tiny_config(num_hidden_layers=4)
    path = write_pytorch(tmp / "src", to_pytorch_original(hf_state(four), four))
    cfg = write_config(tmp / "cfg", tiny_config())
    return path, {"config": cfg}, [str(cfg)]


@bad("missing-tensor-flax")
def _missing_flax(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    config = tiny_config()
    tree = to_flax_tree(hf_state(config), config, "9b")
    del tree["transformer/layer_2/mlp/linear"]
    path = write_flax(tmp / "src" / "ckpt", tree)
    return path, {"config": write_config(tmp / "cfg", config)}, [str(path), "layer_2/mlp/linear"]


@bad("extra-tensor-flax")
def _extra_flax(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    config = tiny_config()
    tree = to_flax_tree(hf_state(config), config, "9b")
    tree["transformer/layer_0/attn/extra_einsum"] = {"w": np.ones((2, 3), np.float32)}
    path = write_flax(tmp / "src" / "ckpt", tree)
    return path, {"config": write_config(tmp / "cfg", config)}, [str(path), "extra_einsum"]


@bad("wrong-shape")
def _wrong_shape(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    _, original, cfg = _tiny_original(tmp)
    key = "model.layers.1.self_attn.o_proj.weight"
    original[key] = original[key].T.contiguous()
    path = write_pytorch(tmp / "src", original)
    return path, {"config": cfg}, [str(path), key]


@bad("config-disagrees-hidden-size")
def _config_hidden(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    _, original, _ = _tiny_original(tmp)
    path = write_pytorch(tmp / "src", original)
    cfg = write_config(tmp / "other", tiny_config(hidden_size=48))
    return path, {"config": cfg}, [str(cfg), "48"]


@bad("config-disagrees-heads-flax")
def _config_heads(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    # H=8, D=6 has the same H*D as the checkpoint's H=4, D=12: only q_einsum's [H, d, D] tells them apart
    config = tiny_config()
    path = write_flax(tmp / "src" / "ckpt", to_flax_tree(hf_state(config), config, "9b"))
    cfg = write_config(tmp / "other", tiny_config(num_attention_heads=8, num_key_value_heads=4, head_dim=6))
    return path, {"config": cfg}, [str(cfg)]


@bad("config-disagrees-vocab")
def _config_vocab(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    _, original, _ = _tiny_original(tmp)
    path = write_pytorch(tmp / "src", original)
    cfg = write_config(tmp / "other", tiny_config(vocab_size=90))
    return path, {"config": cfg}, [str(cfg), "90"]


@bad("nan-pytorch")
def _nan(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    _, original, cfg = _tiny_original(tmp)
    original["model.layers.2.mlp.up_proj.weight"][3, 5] = float("nan")
    path = write_pytorch(tmp / "src", original)
    # small shards: the first ones are already written when the NaN is found
    return path, {"config": cfg, "max_shard_size": "20KB"}, [str(path), "model.layers.2.mlp.up_proj.weight"]


@bad("nan-flax")
def _nan_flax(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    config = tiny_config()
    tree = to_flax_tree(hf_state(config), config, "9b")
    tree["transformer/layer_2/attn/kv_einsum"]["w"][1, 0, 2, 3] = np.nan
    path = write_flax(tmp / "src" / "ckpt", tree)
    return path, {"config": write_config(tmp / "cfg", config)}, [str(path), "layer_2/attn/kv_einsum"]


@bad("orbax-metadata-garbage")
def _orbax_garbage(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    path = tmp / "src" / "ckpt"
    path.mkdir(parents=True)
    (path / "_METADATA").write_text("{not json")
    (path / "manifest.ocdbt").write_bytes(b"\x00\x01garbage")
    return path, {}, [str(path)]


@bad("orbax-array-data-truncated")
def _orbax_no_data(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    # the metadata (names, shapes) is intact, so the error comes while reading arrays mid-conversion
    config = tiny_config()
    path = write_flax(tmp / "src" / "ckpt", to_flax_tree(hf_state(config), config, "9b"))
    for data in (path / "ocdbt.process_0" / "d").iterdir():
        data.write_bytes(b"")
    return path, {"config": write_config(tmp / "cfg", config), "max_shard_size": "20KB"}, [str(path), "transformer/"]


@bad("int8-without-scaler")
def _int8_no_scaler(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    config = tiny_config()
    original = int8_original(config)
    del original["model.layers.0.mlp.gate_proj.weight_scaler"]
    path = write_pytorch(tmp / "src", original)
    return path, {"config": write_config(tmp / "cfg", config)}, [str(path), "model.layers.0.mlp.gate_proj.weight"]


@bad("bin-index-names-a-missing-shard")
def _missing_shard(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    _, original, cfg = _tiny_original(tmp)
    source = tmp / "src"
    source.mkdir()
    torch.save(original, source / "pytorch_model-00001-of-00002.bin")
    weight_map = {k: "pytorch_model-00001-of-00002.bin" for k in original}
    weight_map["model.norm.weight"] = "pytorch_model-00002-of-00002.bin"
    (source / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return source, {"config": cfg}, ["pytorch_model.bin.index.json", "pytorch_model-00002-of-00002.bin"]


@bad("tokenizer-random-file")
def _tokenizer_garbage(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    config = tiny_config(**TOKENIZER_MODEL)
    path = write_pytorch(tmp / "src", to_pytorch_original(hf_state(config, torch.bfloat16), config))
    tokenizer = tmp / "tok" / "tokenizer.model"
    tokenizer.parent.mkdir()
    tokenizer.write_bytes(np.random.default_rng(1).bytes(5000))
    return path, {"config": write_config(tmp / "cfg", config), "tokenizer": tokenizer}, [str(tokenizer)]


@bad("tokenizer-wrong-vocab")
def _tokenizer_wrong_vocab(tmp: Path) -> tuple[Path, dict[str, Any], list[str]]:
    _, original, cfg = _tiny_original(tmp)  # a 97-token model with Gemma's 256000-piece tokenizer
    path = write_pytorch(tmp / "src", original)
    tokenizer = gemma_tokenizer_model()
    return path, {"config": cfg, "tokenizer": tokenizer}, [str(tokenizer), "97"]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_one_clear_error(tmp_path: Path, case: str) -> None:
    source, kwargs, fragments = BAD[case](tmp_path)
    out = tmp_path / "outs" / "hf"
    with pytest.raises(Gemma2Error) as error:
        convert_checkpoint(source, out, progress=False, **kwargs)
    assert type(error.value) is not Gemma2Error and isinstance(error.value, (CheckpointError, ConfigError))
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "Traceback" not in message and "\n" not in message.strip(), f"not one line: {message!r}"
    nothing_left(out)


@pytest.fixture(scope="session")
def maxtext_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The maxtext wheel (it ships Llama's and Mistral's tokenizers too), downloaded once per session."""
    directory = tmp_path_factory.mktemp("maxtext_wheel")
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", "3.12", "maxtext==0.2.5", "-d", str(directory)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    wheels = sorted(directory.glob("maxtext-0.2.5-*.whl"))
    assert result.returncode == 0 and wheels, f"pip download maxtext==0.2.5 failed: {result.stderr[-2000:]}"
    return wheels[0]


def test_tokenizer_that_is_not_gemmas(tmp_path: Path, maxtext_wheel: Path) -> None:
    # Llama 2's tokenizer has 32000 pieces: give the model 32000 tokens so only the pieces tell them apart.
    with zipfile.ZipFile(maxtext_wheel) as wheel:
        data = wheel.read("maxtext/assets/tokenizers/tokenizer.llama2")
    tokenizer = tmp_path / "llama" / "tokenizer.model"
    tokenizer.parent.mkdir()
    tokenizer.write_bytes(data)
    config = tiny_config(**{**TOKENIZER_MODEL, "vocab_size": 32000})
    source = write_pytorch(tmp_path / "src", to_pytorch_original(hf_state(config, torch.bfloat16), config))
    out = tmp_path / "outs" / "hf"
    with pytest.raises(CheckpointError) as error:
        convert_checkpoint(
            source, out, config=write_config(tmp_path / "cfg", config), tokenizer=tokenizer, progress=False
        )
    assert str(tokenizer) in str(error.value) and "Gemma" in str(error.value)
    nothing_left(out)


# ------------------------------------------------------------------------------------------------
# Atomic output, --force


def test_refuses_a_non_empty_out_unless_forced(tmp_path: Path) -> None:
    config = tiny_config(num_hidden_layers=1)
    state = hf_state(config)
    source = write_pytorch(tmp_path / "src", to_pytorch_original(state, config))
    cfg = write_config(tmp_path / "cfg", config)
    out = tmp_path / "outs" / "hf"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError) as error:
        convert_checkpoint(source, out, config=cfg, progress=False)
    assert str(out) in str(error.value) and "force" in str(error.value)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf"]

    convert_checkpoint(source, out, config=cfg, force=True, progress=False)
    assert not (out / "keep.txt").exists()
    assert_same_tensors(out, state, torch.float32)
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf"]

    empty = tmp_path / "outs2" / "empty"
    empty.mkdir(parents=True)  # an existing empty directory is fine without force
    convert_checkpoint(source, empty, config=cfg, progress=False)
    assert_same_tensors(empty, state, torch.float32)


def test_failed_forced_conversion_keeps_the_old_out(tmp_path: Path) -> None:
    config = tiny_config(num_hidden_layers=1)
    original = to_pytorch_original(hf_state(config), config)
    cfg = write_config(tmp_path / "cfg", config)
    out = tmp_path / "outs" / "hf"
    convert_checkpoint(write_pytorch(tmp_path / "good", original), out, config=cfg, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    original["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="down_proj"):
        convert_checkpoint(write_pytorch(tmp_path / "bad", original), out, config=cfg, force=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf"]


# ------------------------------------------------------------------------------------------------
# The command line


def run_cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(GEMMA2), *map(str, args)], capture_output=True, text=True, timeout=timeout, env={**os.environ}
    )


def test_cli_convert_prints_one_summary_line(tmp_path: Path) -> None:
    config = tiny_config(vocab_size=128)  # --instruct: <end_of_turn> (107) must be a token
    state = hf_state(config, torch.bfloat16)
    source = write_pytorch(tmp_path / "src", to_pytorch_original(state, config))
    out = tmp_path / "outs" / "hf"
    cfg = write_config(tmp_path / "cfg", config)
    result = run_cli("convert", source, "--out", out, "--config", cfg, "--dtype", "fp16", "--instruct", "--quiet")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    parameters = sum(t.numel() for t in state.values())
    assert len(lines) == 1 and ("float16" in lines[0] or "fp16" in lines[0])
    assert f"{parameters:,}" in lines[0] or str(parameters) in lines[0]
    assert "Traceback" not in result.stderr
    assert_same_tensors(out, state, torch.float16)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [1, 107]


def test_cli_bad_input_exits_2_with_one_error_line(tmp_path: Path) -> None:
    bogus = tmp_path / "weights.ckpt"
    bogus.write_bytes(b"\x00garbage" * 100)
    out = tmp_path / "outs" / "hf"
    result = run_cli("convert", bogus, "--out", out, "--quiet")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemma2: error:") and str(bogus) in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    nothing_left(out)


def test_cli_force(tmp_path: Path) -> None:
    config = tiny_config(num_hidden_layers=1)
    state = hf_state(config)
    source = write_pytorch(tmp_path / "src", to_pytorch_original(state, config))
    cfg = write_config(tmp_path / "cfg", config)
    out = tmp_path / "outs" / "hf"
    out.mkdir(parents=True)
    (out / "old.txt").write_text("old")
    refused = run_cli("convert", source, "--out", out, "--config", cfg, "--quiet")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("gemma2: error:") and "--force" in refused.stderr
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    forced = run_cli("convert", source, "--out", out, "--config", cfg, "--force")  # with the progress bar
    assert forced.returncode == 0, forced.stderr
    assert len(forced.stdout.splitlines()) == 1 and "Traceback" not in forced.stderr
    assert not (out / "old.txt").exists()
    assert_same_tensors(out, state, torch.float32)


# ------------------------------------------------------------------------------------------------
# Memory: the conversion streams (peak RSS near one shard, not the whole checkpoint)

MEASURE = textwrap.dedent(
    """
    import json, sys, time
    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    import torch
    from gemma2.convert import convert_checkpoint
    baseline = status("VmRSS")
    start = time.perf_counter()
    summary = convert_checkpoint(sys.argv[1], sys.argv[2], config=sys.argv[3] or None, max_shard_size=sys.argv[4],
                                 progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps(dict(baseline=baseline, peak=status("VmHWM"), seconds=seconds, variant=summary.variant,
                          parameters=summary.parameters, shards=summary.shards, bytes=summary.bytes)))
    """
)


def measure_conversion(source: Path, out: Path, config: Path | None, max_shard_size: str) -> dict[str, Any]:
    command = [sys.executable, "-c", MEASURE, str(source), str(out), str(config or ""), max_shard_size]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def random_original(config: Gemma2Config, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """An original-layout state dict with random weights, built directly (no model), layer by layer."""
    generator = torch.Generator().manual_seed(seed)
    h, k, dim, d, f = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.hidden_size,
        config.intermediate_size,
    )

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=generator, dtype=dtype) * 0.02).to(dtype)

    original = {"embedder.weight": randn(config.vocab_size, d)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        original[f"{p}self_attn.qkv_proj.weight"] = randn((h + 2 * k) * dim, d)
        original[f"{p}self_attn.o_proj.weight"] = randn(d, h * dim)
        original[f"{p}mlp.gate_proj.weight"] = randn(f, d)
        original[f"{p}mlp.up_proj.weight"] = randn(f, d)
        original[f"{p}mlp.down_proj.weight"] = randn(d, f)
        for name in NORMS:
            original[f"{p}{name}.weight"] = randn(d)
    original["model.norm.weight"] = randn(d)
    original["freqs_cis"] = freqs_cis(config)
    return original


# 284 MB in fp32; no tensor is more than 4.2 MB, so 50 MB shards make the checkpoint six shards.
STREAMING = dict(
    vocab_size=8000,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=17,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    query_pre_attn_scalar=64,
    sliding_window=4096,
    max_position_embeddings=2048,
)


def test_conversion_streams_peak_memory(tmp_path: Path) -> None:
    config = Gemma2Config(**STREAMING)
    original = random_original(config, torch.float32)
    source = write_pytorch(tmp_path / "src", original)
    del original
    checkpoint_bytes = source.stat().st_size
    out = tmp_path / "outs" / "hf"
    start = time.perf_counter()
    try:
        measured = measure_conversion(source, out, write_config(tmp_path / "cfg", config), "50MB")
    finally:  # keep pytest's retained temporary directories small
        source.unlink()
    wall = time.perf_counter() - start
    growth = measured["peak"] - measured["baseline"]
    print(
        f"\n[convert streaming] checkpoint {checkpoint_bytes / 1e6:.1f} MB fp32, {measured['shards']} shards: "
        f"baseline RSS {measured['baseline'] / 1e6:.1f} MB, peak RSS (VmHWM) {measured['peak'] / 1e6:.1f} MB, "
        f"growth {growth / 1e6:.1f} MB = {growth / checkpoint_bytes:.2f} x checkpoint; "
        f"conversion {measured['seconds']:.1f} s, child wall {wall:.1f} s"
    )
    assert measured["shards"] >= 5
    assert 250e6 < checkpoint_bytes < 300e6
    assert growth < 0.6 * checkpoint_bytes, f"peak grew by {growth / 1e6:.0f} MB: the conversion does not stream"
    assert len(list(out.glob("*.safetensors"))) == measured["shards"]
    shutil.rmtree(out)


# ------------------------------------------------------------------------------------------------
# Slow: a real gemma-2-2b-shaped checkpoint (5.2 GB bf16), variant detected from the shapes

GEMMA_2_2B = dict(
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    query_pre_attn_scalar=256,
    max_position_embeddings=8192,
    sliding_window=4096,
)


@pytest.mark.slow
def test_real_2b_shaped_checkpoint_is_detected(tmp_path: Path) -> None:
    config = Gemma2Config(**GEMMA_2_2B)
    start = time.perf_counter()
    original = random_original(config, torch.bfloat16)
    q_rows, kv_rows = 8 * 256, 4 * 256  # H * D, K * D
    k_key = "model.layers.25.self_attn.k_proj.weight"
    reference = {
        k_key: original["model.layers.25.self_attn.qkv_proj.weight"][q_rows : q_rows + kv_rows].clone(),
        "model.embed_tokens.weight": original["embedder.weight"][-3:].clone(),
    }
    source = write_pytorch(tmp_path / "src", original)
    del original
    checkpoint_bytes = source.stat().st_size
    built = time.perf_counter() - start
    out = tmp_path / "outs" / "hf"
    try:
        measured = measure_conversion(source, out, None, "5GB")  # the default shard size: 2 shards
        growth = measured["peak"] - measured["baseline"]
        print(
            f"\n[convert 2b] checkpoint {checkpoint_bytes / 1e9:.2f} GB bf16 (built in {built:.0f} s): converted in "
            f"{measured['seconds']:.1f} s into {measured['shards']} shards; "
            f"baseline RSS {measured['baseline'] / 1e6:.0f} MB, peak RSS (VmHWM) {measured['peak'] / 1e6:.0f} MB, "
            f"growth {growth / 1e9:.2f} GB = {growth / checkpoint_bytes:.2f} x checkpoint"
        )
        assert measured["variant"] == "2b"
        assert measured["parameters"] == 2_614_341_888
        written = json.loads((out / "config.json").read_text())
        for field, value in GEMMA_2_2B.items():
            assert written[field] == value, field
        assert written.get("dtype", written.get("torch_dtype")) == "bfloat16"
        assert written["final_logit_softcapping"] == 30.0 and written["attn_logit_softcapping"] == 50.0
        tensors = {}
        for file in out.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as handle:
                for key in reference:
                    if key in handle.keys():
                        tensors[key] = handle.get_tensor(key)
        assert torch.equal(tensors[k_key], reference[k_key])
        assert tensors["model.embed_tokens.weight"].shape == (256000, 2304)
        assert torch.equal(tensors["model.embed_tokens.weight"][-3:], reference["model.embed_tokens.weight"])
        assert growth < 0.6 * checkpoint_bytes, f"peak grew by {growth / 1e9:.2f} GB: the conversion does not stream"
    finally:  # 10 GB on disk: do not leave it in pytest's kept temporary directories
        source.unlink(missing_ok=True)
        shutil.rmtree(out, ignore_errors=True)
