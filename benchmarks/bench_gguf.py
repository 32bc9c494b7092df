"""llama.cpp columns of the CPU speed benchmark (optional): the same weights written as GGUF files.

Only when llama-cpp-python and gguf are importable: `prepare_llama_cpp` writes the bf16 GGUF file
(`write_gguf`) and quantizes it to Q8_0 and Q4_0 with llama.cpp's own quantizer.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench_setup import LLAMA_CPP, LLAMA_CPP_TYPES

# ----------------------------------------------------------------------------------------------
# llama.cpp (optional): the same weights as GGUF


def llama_cpp_missing() -> str | None:
    """Why the llama.cpp columns cannot run, or None when they can."""
    missing = []
    for module, package in (("llama_cpp", "llama-cpp-python"), ("gguf", "gguf"), ("numpy", "numpy")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    return f"{' and '.join(missing)} not installed" if missing else None


def gguf_tensor_name(key: str) -> str | None:
    """The GGUF name of a Hugging Face Gemma 2 tensor (None for the tied lm_head)."""
    if key == "model.embed_tokens.weight":
        return "token_embd.weight"
    if key == "model.norm.weight":
        return "output_norm.weight"
    if key == "lm_head.weight":
        return None
    parts = key.split(".")  # model.layers.{i}.{module...}.weight
    if parts[:2] != ["model", "layers"] or len(parts) < 5:
        raise ValueError(f"no GGUF name for {key}")
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "post_feedforward_layernorm": "post_ffw_norm",
    }
    return f"blk.{parts[2]}.{names['.'.join(parts[3:-1])]}.{parts[-1]}"


def write_gguf(checkpoint: Path, out: Path) -> None:
    """The checkpoint as a bf16 GGUF file of architecture "gemma2", as llama.cpp's converter writes it.

    Norm weights are stored as float32 with Gemma's +1 folded in (llama.cpp multiplies by w, not
    1 + w). The vocabulary is a placeholder of the right size (special tokens at the config's ids,
    the 256 byte tokens, then numbered pieces): the benchmark feeds token ids, never text.
    """
    import gguf
    import torch
    from safetensors import safe_open

    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    writer = gguf.GGUFWriter(str(out), "gemma2")
    writer.add_name("gemma2 bench (random weights)")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    writer.add_sliding_window(config["sliding_window"])
    add_placeholder_vocab(writer, config)
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as tensors:
            for key in tensors.keys():
                name = gguf_tensor_name(key)
                if name is None:
                    continue
                tensor = tensors.get_tensor(key)
                if tensor.dim() == 1:
                    writer.add_tensor(name, (tensor.float() + 1).numpy())
                else:
                    data = tensor.to(torch.bfloat16).view(torch.int16).numpy()
                    writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_placeholder_vocab(writer: Any, config: dict[str, Any]) -> None:
    import gguf

    size = config["vocab_size"]
    special = {
        config.get("pad_token_id", 0): "<pad>",
        _first(config.get("eos_token_id", 1)): "<eos>",
        config.get("bos_token_id", 2): "<bos>",
        3: "<unk>",
    }
    byte_ids = range(4, 4 + 256) if size >= 4 + 256 else range(0)
    tokens, types = [], []
    for i in range(size):
        if i in special:
            tokens.append(special[i])
            types.append(gguf.TokenType.UNKNOWN if special[i] == "<unk>" else gguf.TokenType.CONTROL)
        elif i in byte_ids:
            tokens.append(f"<0x{i - 4:02X}>")
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(f"\u2581piece{i}")
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(size)])
    writer.add_token_types(types)
    writer.add_bos_token_id(config.get("bos_token_id", 2))
    writer.add_eos_token_id(_first(config.get("eos_token_id", 1)))
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(config.get("pad_token_id", 0))
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)


def _first(value: int | list[int]) -> int:
    return value[0] if isinstance(value, list) else value


def llama_cpp_quantize(source: Path, out: Path, kind: str, threads: int) -> None:
    """Q8_0 / Q4_0 with llama.cpp's own quantizer (its usual choice for the output tensor)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
    params.nthread = threads
    with native_output_silenced():
        done = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if done != 0:
        raise RuntimeError(f"llama_model_quantize to {kind} failed")


@contextlib.contextmanager
def native_output_silenced() -> Iterator[None]:
    """Send what C code prints (llama.cpp logs every tensor it quantizes) to /dev/null meanwhile."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def prepare_llama_cpp(checkpoint: Path, work: Path, threads: int) -> dict[str, Path]:
    """GGUF files for the llama.cpp columns: {"llama.cpp bf16": path, ...}; {} when unavailable.

    Never raises: a missing package or a failed step is printed as one line and skipped.
    """
    missing = llama_cpp_missing()
    if missing:
        print(f"llama.cpp columns skipped: {missing} (pip install llama-cpp-python gguf)")
        return {}
    files: dict[str, Path] = {}
    try:
        work.mkdir(parents=True, exist_ok=True)
        bf16 = work / "model-bf16.gguf"
        write_gguf(checkpoint, bf16)
        files[f"{LLAMA_CPP} bf16"] = bf16
        for kind in LLAMA_CPP_TYPES[1:]:
            out = work / f"model-{kind}.gguf"
            llama_cpp_quantize(bf16, out, kind, threads)
            files[f"{LLAMA_CPP} {kind}"] = out
    except Exception as error:  # optional part: report and go on with what was written
        print(f"llama.cpp: stopped preparing GGUF files: {type(error).__name__}: {error}")
    return files
