"""Convert an original Gemma 2 checkpoint (PyTorch or Flax/Orbax) to a Hugging Face directory.

The steps, each failing with an error that names the file and the tensor or field:
1. detect the format (or check --format), read names / shapes / dtypes without loading data;
2. refuse other model families (Gemma 1, Gemma 3, Llama), read the architecture off the shapes,
   detect the variant (or check --variant / --config against the shapes), and check that every
   tensor the layout expects is there with its shape and nothing else is;
3. stream: plan the output shards from the shapes, then build one shard at a time (read, transform,
   cast, check for NaN/Inf, write, free), so memory stays near one shard, not the whole model;
4. write config.json (the variant's official values, the real dtype), generation_config.json,
   the tokenizer files, all in a temporary directory renamed into place on success;
5. re-read the written headers and check every tensor is there with its shape.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gemma2.config import PRESETS, Gemma2Config
from gemma2.convert import layouts
from gemma2.convert.sources import (
    Source,
    SourceTensor,
    detect_format,
    read_flax,
    read_pytorch,
    release_pages,
)
from gemma2.errors import CheckpointError, ConfigError
from gemma2.io.checkpoint import (
    AtomicDirectory,
    CheckpointReader,
    check_new_output,
    parse_size,
    plan_shards,
    resolve_dtype,
    shard_file_names,
    write_index,
)

END_OF_TURN = 107
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@dataclass
class ConversionSummary:
    out: Path
    variant: str
    format: str
    parameters: int
    dtype: str
    bytes: int
    shards: int
    seconds: float

    def line(self) -> str:
        return (
            f"converted {self.variant} ({self.format}) -> {self.out}: {self.parameters:,} parameters, {self.dtype}, "
            f"{self.bytes / 1e9:.2f} GB in {self.shards} shard(s), {self.seconds:.1f} s"
        )


def _dequantize_int8(source: Source) -> Source:
    """Fold gemma_pytorch's int8 weights and their per-row `weight_scaler` into float tensors."""
    scalers = {k for k in source if k.endswith(".weight_scaler")}
    if not scalers:
        return source
    floats = [t.dtype for k, t in source.items() if k not in scalers and t.dtype.is_floating_point]
    float_dtype = floats[0] if floats else torch.float32
    out: Source = {}
    for key, tensor in source.items():
        if key in scalers:
            continue
        scaler_key = key.removesuffix(".weight") + ".weight_scaler"
        if scaler_key in scalers:
            scaler = source[scaler_key]
            if scaler.shape not in ((tensor.shape[0],), (tensor.shape[0], 1)):
                raise CheckpointError(
                    f"{scaler.file}: {scaler_key!r} has shape {list(scaler.shape)}, expected [{tensor.shape[0]}] "
                    f"(one scale per row of {key!r})"
                )

            def load(w: SourceTensor = tensor, s: SourceTensor = scaler) -> torch.Tensor:
                return (w.load().float() * s.load().float().reshape(-1, 1)).to(float_dtype)

            def release(w: SourceTensor = tensor, s: SourceTensor = scaler) -> None:
                for part in (w, s):
                    if part.release is not None:
                        part.release()

            out[key] = SourceTensor(tensor.shape, float_dtype, tensor.file, load, release)
        elif not tensor.dtype.is_floating_point:
            raise CheckpointError(f"{tensor.file}: tensor {key!r} is {tensor.dtype} and has no weight_scaler")
        else:
            out[key] = tensor
    return out


def _choose_config(
    arch: layouts.Architecture, variant: str | None, config_path: Path | None, where: Path, padded_vocab: bool
) -> tuple[Gemma2Config, str]:
    """The architecture to write: --config (checked against the shapes), else the official variant
    the shapes match (checked against --variant)."""
    detected = layouts.official_variant(arch, padded_vocab)
    if variant is not None:
        if variant not in layouts.PRESET_BY_VARIANT:
            raise ConfigError(f"--variant {variant!r} is not one of {sorted(layouts.PRESET_BY_VARIANT)}")
        if detected != variant:
            raise CheckpointError(
                f"{where}: --variant {variant} does not fit the tensor shapes ({arch.describe()})"
                + (f"; they are those of {detected}" if detected else "")
            )
    if config_path is not None:
        config = Gemma2Config.from_json_file(config_path)
        if not arch.matches(config, padded_vocab):
            raise ConfigError(
                f"{config_path}: does not fit the checkpoint at {where} ({arch.describe()}; the config says "
                f"d={config.hidden_size}, F={config.intermediate_size}, {config.num_hidden_layers} layers, "
                f"H={config.num_attention_heads}, K={config.num_key_value_heads}, D={config.head_dim}, "
                f"vocab {config.vocab_size})"
            )
        return config, detected or "custom"
    if detected is None:
        raise CheckpointError(
            f"{where}: the tensor shapes fit no official Gemma 2 variant ({arch.describe()}); "
            f"pass --config config.json with the architecture"
        )
    return Gemma2Config(**PRESETS[layouts.PRESET_BY_VARIANT[detected]]), detected


def _check_source(source: Source, expected: dict[str, tuple[int, ...]]) -> None:
    for key, tensor in source.items():
        if key not in expected:
            raise CheckpointError(f"{tensor.file}: unexpected tensor {key!r} (shape {list(tensor.shape)})")
        if tensor.shape != expected[key]:
            raise CheckpointError(
                f"{tensor.file}: tensor {key!r} has shape {list(tensor.shape)}, expected {list(expected[key])}"
            )
    for key in expected:
        if key not in source:
            where = next(iter(source.values())).file
            raise CheckpointError(f"{where}: checkpoint is missing tensor {key!r}")


def _check_tokenizer(path: Path, config: Gemma2Config) -> Any:
    from gemma2.tokenizer import Gemma2Tokenizer, TokenizerError

    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer file not found")
    try:
        tokenizer = Gemma2Tokenizer.from_pretrained(path)
    except TokenizerError as error:
        raise CheckpointError(f"{path}: not a Gemma tokenizer ({error})") from None
    facts = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 106, "<end_of_turn>": END_OF_TURN}
    wrong = {t: tokenizer.convert_tokens_to_ids(t) for t, i in facts.items() if tokenizer.convert_tokens_to_ids(t) != i}
    if tokenizer.vocab_size != config.vocab_size or wrong:
        raise CheckpointError(
            f"{path}: not Gemma's tokenizer ({tokenizer.vocab_size} pieces for a {config.vocab_size}-token "
            f"model{'; ' + ', '.join(f'{t} is {i}' for t, i in wrong.items()) if wrong else ''})"
        )
    return tokenizer


def convert_checkpoint(
    source: str | Path,
    out: str | Path,
    *,
    format: str | None = None,
    variant: str | None = None,
    instruct: bool = False,
    tokenizer: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    config: str | Path | None = None,
    force: bool = False,
    max_shard_size: int | str = "5GB",
    progress: bool = True,
) -> ConversionSummary:
    """Convert SOURCE (original PyTorch or Flax/Orbax Gemma 2) into a Hugging Face directory OUT."""
    start = time.perf_counter()
    source_path, out = Path(source), Path(out)
    check_new_output(out, force)
    max_bytes = parse_size(max_shard_size)
    target_dtype = resolve_dtype(dtype)
    detected_format = detect_format(source_path)
    if format is not None and format != detected_format:
        raise CheckpointError(f"{source_path}: --format {format} given, but the files are the {detected_format} format")

    tensors = read_flax(source_path) if detected_format == "flax" else read_pytorch(source_path)
    if detected_format == "pytorch":
        tensors.pop("freqs_cis", None)  # a rotary buffer, recomputed by every implementation
        tensors = _dequantize_int8(tensors)
    layouts.check_family(tensors, detected_format)
    if detected_format == "pytorch":
        arch = layouts.pytorch_architecture(tensors)
    else:
        arch = layouts.flax_architecture(tensors)
    padded_vocab = detected_format == "flax"  # only the Flax embedding carries padding rows
    config_path = Path(config) if config else None
    model_config, variant_name = _choose_config(arch, variant, config_path, source_path, padded_vocab)
    if detected_format == "pytorch":
        _check_source(tensors, layouts.pytorch_source_shapes(model_config, arch.vocab_rows))
        recipes = layouts.pytorch_recipes(tensors, model_config)
    else:
        official = variant_name if variant_name != "custom" else None
        transposed = layouts.flax_gating_transposed(tensors, model_config, official)
        _check_source(tensors, layouts.flax_source_shapes(model_config, arch.vocab_rows, transposed))
        recipes = layouts.flax_recipes(model_config, transposed)
    gemma_tokenizer = _check_tokenizer(Path(tokenizer), model_config) if tokenizer is not None else None

    stored = tensors[recipes["model.embed_tokens.weight"].sources[0]].dtype
    out_dtype = target_dtype or stored
    dtype_name = str(out_dtype).removeprefix("torch.")
    eos: int | list[int] = [1, END_OF_TURN] if instruct else 1
    model_config = model_config.replace(architectures=["Gemma2ForCausalLM"], dtype=dtype_name, eos_token_id=eos)

    sizes = {key: math.prod(recipe.shape) * out_dtype.itemsize for key, recipe in recipes.items()}
    shards = plan_shards(sizes, max_bytes)
    total_bytes = sum(sizes.values())
    bar = _Progress(len(recipes), total_bytes, progress)
    with AtomicDirectory(out, keep_other_files=False) as scratch:
        names = shard_file_names(len(shards))
        weight_map: dict[str, str] = {}
        for name, keys in zip(names, shards):
            shapes = {key: recipes[key].shape for key in keys}
            with SafetensorsStreamWriter(scratch / name, shapes, out_dtype) as writer:
                for key in keys:
                    tensor = _build(key, recipes[key], tensors, out_dtype)
                    writer.write(key, tensor)
                    bar.update(1, tensor.numel() * tensor.element_size())
                    del tensor
            weight_map.update({key: name for key in keys})
        if len(shards) > 1:
            write_index(scratch, weight_map, total_bytes)
        (scratch / "config.json").write_text(model_config.to_json_string())
        generation = {"bos_token_id": 2, "eos_token_id": eos, "pad_token_id": 0, "cache_implementation": "hybrid"}
        (scratch / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if gemma_tokenizer is not None:
            gemma_tokenizer.save_pretrained(scratch)
        _verify_written(scratch, recipes)
    bar.close()
    parameters = sum(math.prod(r.shape) for r in recipes.values())
    return ConversionSummary(
        out,
        variant_name,
        detected_format,
        parameters,
        dtype_name,
        total_bytes,
        len(shards),
        time.perf_counter() - start,
    )


BLOCK_BYTES = 64 << 20  # rows copied (and checked) at a time


def _build(key: str, recipe: layouts.Recipe, tensors: Source, dtype: torch.dtype) -> torch.Tensor:
    """Build one output tensor, copying and checking it a block of rows at a time.

    Blocks keep memory near the output tensor's own size: the NaN/Inf check's temporaries stay
    small, and pages of a memory-mapped source are dropped as soon as their rows are copied.
    """
    sources = [tensors[name] for name in recipe.sources]
    mapped = all(source.mapped for source in sources)
    with torch.no_grad():
        view = recipe.build(*(source.load() for source in sources))
        if tuple(view.shape) != recipe.shape:
            raise CheckpointError(f"{key}: built shape {list(view.shape)}, expected {list(recipe.shape)}")
        out = torch.empty(view.shape, dtype=dtype)
        rows = view.shape[0] if view.dim() > 0 else 1
        row_bytes = max(1, view[0].numel() * view.element_size()) if view.dim() > 1 else BLOCK_BYTES
        block = max(1, BLOCK_BYTES // row_bytes)
        for lo in range(0, rows, block):
            part = view[lo : lo + block] if view.dim() > 0 else view
            target = out[lo : lo + block] if view.dim() > 0 else out
            target.copy_(part)
            if not bool(torch.isfinite(target).all()):
                names = ", ".join(recipe.sources)
                raise CheckpointError(f"{sources[0].file}: {names} holds NaN or Inf values (for {key})")
            if mapped and part.is_contiguous():
                release_pages(part)
    for source in sources:
        if source.release is not None:
            source.release()
    return out


def _verify_written(directory: Path, recipes: dict[str, layouts.Recipe]) -> None:
    reader = CheckpointReader(directory)
    written = set(reader.keys())
    for key, recipe in recipes.items():
        if key not in written:
            raise CheckpointError(f"{directory}: written checkpoint lacks {key!r}")
        if reader.shape(key) != recipe.shape:
            raise CheckpointError(f"{directory}: written {key!r} has shape {list(reader.shape(key))}")


class SafetensorsStreamWriter:
    """Write a safetensors file one tensor at a time, so only one tensor is ever in memory.

    safetensors' own save_file needs every tensor of a file at once; the format itself is simple
    (an 8-byte little-endian header length, a JSON header of names, dtypes, shapes and byte
    offsets padded to 8 bytes, then the raw data), and all shapes are known before converting, so
    the header is written first and each tensor is appended as soon as it is built.
    """

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> None:
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"cannot store {dtype} (use bfloat16, float16 or float32)")
        self.path, self.dtype, self.order = path, dtype, list(shapes)
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, shape in shapes.items():
            size = math.prod(shape) * dtype.itemsize
            offsets = [offset, offset + size]
            header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": offsets}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        self.header = text + b" " * (-len(text) % 8)
        self.next = 0

    def __enter__(self) -> SafetensorsStreamWriter:
        self.file = open(self.path, "wb")  # closed in __exit__
        self.file.write(len(self.header).to_bytes(8, "little") + self.header)
        return self

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self.next >= len(self.order) or key != self.order[self.next] or tensor.dtype != self.dtype:
            raise CheckpointError(f"{self.path}: tensor {key!r} written out of order or with dtype {tensor.dtype}")
        if tensor.numel():
            tensor.contiguous().view(torch.uint8).numpy().tofile(self.file)  # no copy of the data
        self.next += 1

    def __exit__(self, *exc: Any) -> None:
        self.file.close()
        if exc[0] is None and self.next != len(self.order):
            raise CheckpointError(f"{self.path}: only {self.next} of {len(self.order)} tensors were written")


class _Progress:
    def __init__(self, tensors: int, total_bytes: int, enabled: bool) -> None:
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=tensors, unit="tensor", desc="converting", file=sys.stderr, leave=False)
        self.written = 0
        self.total = total_bytes

    def update(self, tensors: int, written: int) -> None:
        """Count tensors done and bytes written."""
        self.written += written
        if self.bar is not None:
            self.bar.update(tensors)
            self.bar.set_postfix_str(f"{self.written / 1e9:.2f}/{self.total / 1e9:.2f} GB written")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
