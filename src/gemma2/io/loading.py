"""Loading and saving Gemma2PreTrainedModel checkpoints (the bodies of from_pretrained / save_pretrained).

Loading builds the model on the meta device (no random initialisation: for gemma-2-2b that alone
costs tens of seconds), checks every checkpoint key and shape against the model before reading a
byte of tensor data, then reads each tensor, converts its dtype and assigns it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gemma2.config import Gemma2Config
from gemma2.errors import InputError
from gemma2.io.checkpoint import (
    AtomicDirectory,
    CheckpointError,
    CheckpointReader,
    parse_size,
    resolve_checkpoint_dir,
    resolve_dtype,
    write_safetensors,
)
from gemma2.pretrained import Gemma2PreTrainedModel, LoadingInfo, ModelT

logger = logging.getLogger("gemma2")

# Checkpoint keys that are safe to skip: the tied LM head (the embedding is the head), rotary
# buffers some old checkpoints saved, and a head's weights when loading a different head.
_IGNORABLE = ("lm_head.weight", "rotary_emb.inv_freq", "score.weight", "score.bias")


@contextmanager
def skeleton_construction() -> Iterator[None]:
    """Build modules on the meta device without running any initialiser.

    Every value will come from the checkpoint, so initialising is wasted work; and torch's meta
    kernels for random fills are Python code whose first use imports torch._dynamo (over a second).
    The initialisers are swapped for no-ops only while the skeleton is built (not thread-safe).
    """
    names = ("normal_", "uniform_", "kaiming_uniform_", "xavier_uniform_", "zeros_", "ones_", "constant_")
    saved = {name: getattr(nn.init, name) for name in names}
    try:
        for name in names:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def read_generation_config(directory: Path) -> dict[str, Any]:
    """generation_config.json of a checkpoint directory, or {} when it has none."""
    path = directory / "generation_config.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None
    return data if isinstance(data, dict) else {}


def load_pretrained(
    cls: type[ModelT],
    path: str | Path,
    *,
    config: Gemma2Config | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    ignore_mismatched_sizes: bool = False,
    torch_dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
    backend: str = "auto",
    tp_plan: str | None = None,
    **config_overrides: Any,
) -> ModelT:
    """Load a Hugging Face layout checkpoint (local directory or hub id).

    `dtype` converts on load (None or "auto" keeps the stored dtype); keyword arguments that
    name config fields override config.json (e.g. num_labels=3 for a new classifier).
    A checkpoint saved quantized loads quantized; `quantize="int8"|"int4"` quantizes a
    full-precision one after loading (see gemma2.quant). `backend` picks the kernels it runs
    (gemma2.backends: "auto", "cpu" or "torch"), applied last. `tp_plan="auto"` shards the model
    over the default process group (gemma2.distributed), each rank reading only its slices.
    """

    from gemma2 import quant as quantization
    from gemma2.backends import BACKENDS, apply_backend

    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")

    if group_size is not None and quantize is None:
        raise InputError("group_size applies only with quantize='int4'")
    target_dtype = resolve_dtype(dtype if dtype is not None else torch_dtype)
    directory = resolve_checkpoint_dir(path, revision=revision, cache_dir=cache_dir, token=token)
    if config is None:
        config = Gemma2Config.from_json_file(directory / "config.json")
    if config_overrides:
        config = config.replace(**config_overrides)
    reader = CheckpointReader(directory)
    with skeleton_construction():
        model = cls(config)
        stored_quantized = config.extra.get("quantization_config")
        if stored_quantized is not None:
            quantization.prepare_for_loading(model, stored_quantized, str(directory / "config.json"))
    fixed_dtypes = quantization.stored_dtype_tensors(model)
    plan = plan_loading(model, reader, ignore_mismatched_sizes, fixed_dtypes)
    sharding = None
    if tp_plan is not None:  # sizes checked and the skeleton cut to this rank's slices, before any read
        int4_group = (stored_quantized or {}).get("group_size") if stored_quantized else None
        if quantize == "int4":
            int4_group = group_size or quantization.DEFAULT_GROUP_SIZE
        sharding = _TensorParallelLoad(model, tp_plan, int4_group)
    if target_dtype is None:
        stored = {reader.dtype(key) for name, key in plan.sources.items() if name not in fixed_dtypes}
        floating = sorted((d for d in stored if d.is_floating_point), key=str)
        target_dtype = floating[0] if len(floating) == 1 else torch.float32
    device = torch.device(device)
    wanted = {
        name: target_dtype if reader.dtype(key).is_floating_point and name not in fixed_dtypes else None
        for name, key in plan.sources.items()
    }

    def read(name: str) -> torch.Tensor:
        key = plan.sources[name]
        part = None if sharding is None else sharding.slice_of(name, reader.shape(key))
        if part is None:
            return reader.read(key, wanted[name])
        return reader.read_slice(key, *part, wanted[name])

    state: dict[str, torch.Tensor] = {}
    if device.type == "cpu":
        # Not left memory-mapped: decoding reads weights faster from huge pages (weight_memory).
        # Filling fresh pages is most of the work, and it runs in parallel outside the GIL.
        with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
            state = dict(zip(wanted, pool.map(read, list(wanted)), strict=True))
    else:
        state = {name: read(name).to(device) for name in wanted}
    model.load_state_dict(state, strict=False, assign=True)
    materialize_missing(model, plan.new, target_dtype, device)
    model.tie_weights()
    model.config.dtype = str(target_dtype).removeprefix("torch.")
    model.loading_info = LoadingInfo(plan.new, plan.ignored, plan.mismatched, reader.bytes_read)
    model.generation_config = read_generation_config(directory)
    if plan.new:
        logger.warning(
            "%s: newly initialised (not in the checkpoint at %s): %s. Train them before use.",
            cls.__name__,
            directory,
            ", ".join(plan.new),
        )
    if plan.ignored:
        logger.info("%s: ignored checkpoint keys: %s", cls.__name__, ", ".join(plan.ignored))
    if quantize is not None:
        if stored_quantized is not None:
            raise CheckpointError(
                f"{directory}: the checkpoint is already quantized; load it as it is (no quantize / --quantize)"
            )
        absmax = sharding.row_absmax(model) if sharding is not None and quantize == "int8" else None
        quantization.quantize(model, quantize, group_size or quantization.DEFAULT_GROUP_SIZE, absmax)
    if sharding is not None:
        sharding.install(model)
    apply_backend(model, backend)
    return model.eval()


class _TensorParallelLoad:
    """from_pretrained(..., tp_plan="auto"): this rank's layout, its slice of each tensor, then the hooks."""

    def __init__(self, model: Gemma2PreTrainedModel, tp_plan: str, int4_group: int | None) -> None:
        if tp_plan != "auto":
            raise InputError(f"tp_plan must be 'auto' (gemma2.distributed's plan), got {tp_plan!r}")
        from gemma2.distributed import tensor_parallel

        self.tp = tensor_parallel
        try:
            self.collectives = tensor_parallel.Collectives()
        except RuntimeError as error:
            raise InputError(
                f"tp_plan='auto': {error} (run under torchrun, or call torch.distributed.init_process_group first)"
            ) from None
        self.layout = tensor_parallel.layout_for(model, self.collectives, int4_group)
        with torch.no_grad():
            tensor_parallel.keep_local_slices(model, self.layout)

    def slice_of(self, name: str, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        from gemma2.distributed.plan import parameter_slice

        return parameter_slice(name, shape, self.layout)

    def row_absmax(self, model: Gemma2PreTrainedModel) -> dict[nn.Module, torch.Tensor]:
        return self.tp.row_absmax(model, self.collectives)

    def install(self, model: Gemma2PreTrainedModel) -> None:
        self.tp.install(model, self.collectives, self.layout)


def plan_loading(
    model: Gemma2PreTrainedModel,
    reader: CheckpointReader,
    ignore_mismatched: bool,
    fixed_dtypes: dict[str, torch.dtype],
) -> _LoadPlan:
    """Match checkpoint keys to parameter names and check shapes, reading no tensor data."""
    cls, config = type(model), model.config
    params = model.checkpoint_state_dict()
    expected = {name: tuple(t.shape) for name, t in params.items()}
    prefix = cls.base_model_prefix
    plan = _LoadPlan()
    for key in reader.keys():
        name = _adapt_key(key, prefix)
        if name in expected:
            plan.sources[name] = key
        elif name.removeprefix("model.").startswith(_IGNORABLE) or name.startswith(_IGNORABLE):
            plan.ignored.append(key)
        else:
            raise CheckpointError(
                f"{reader.file_of(key)}: unexpected tensor {key!r} (not a parameter of {cls.__name__} "
                f"with {config.num_hidden_layers} layers)"
            )
    for name, shape in expected.items():
        if name not in plan.sources:
            if name in cls.head_keys:
                plan.new.append(name)
                continue
            raise CheckpointError(f"{reader.directory}: checkpoint is missing tensor {name!r}")
        key = plan.sources[name]
        stored_dtype = reader.dtype(key)
        if name in fixed_dtypes and stored_dtype != fixed_dtypes[name]:
            raise CheckpointError(
                f"{reader.file_of(key)}: quantized tensor {key!r} is stored as {stored_dtype}, "
                f"expected {fixed_dtypes[name]}"
            )
        if params[name].is_floating_point() and not stored_dtype.is_floating_point:
            raise CheckpointError(
                f"{reader.file_of(key)}: tensor {key!r} is stored as {stored_dtype}, expected floating point"
            )
        found = reader.shape(key)
        if found != shape:
            if ignore_mismatched and name in cls.head_keys:
                del plan.sources[name]
                plan.new.append(name)
                plan.mismatched.append(name)
                continue
            raise CheckpointError(
                f"{reader.file_of(key)}: tensor {key!r} has shape {list(found)}, expected {list(shape)} from the config"
            )
    return plan


def materialize_missing(
    model: Gemma2PreTrainedModel, names: list[str], dtype: torch.dtype, device: torch.device
) -> None:
    """Give freshly initialised values to head parameters the checkpoint did not have.

    Only the missing parameters themselves: a loaded score.weight keeps its values when only
    score.bias is new (a sequence-classification checkpoint loaded as a token classifier).
    """
    modules = dict(model.named_modules())
    for name in names:
        module_name, _, attr = name.rpartition(".")
        module = modules[module_name]
        fresh = torch.empty(getattr(module, attr).shape, dtype=dtype, device=device)
        if attr == "bias":
            nn.init.zeros_(fresh)
        else:
            nn.init.normal_(fresh, mean=0.0, std=model.config.initializer_range)
        setattr(module, attr, nn.Parameter(fresh))


def save_pretrained(model: Gemma2PreTrainedModel, directory: str | Path, max_shard_size: int | str = "5GB") -> None:
    """Write config.json and safetensors weights (sharded with an index when over the size).

    Everything is written to a temporary directory first: a failure leaves nothing half-written.
    """
    max_bytes = parse_size(max_shard_size)
    tensors = {k: v.detach().contiguous() for k, v in model.checkpoint_state_dict().items()}
    if any(t.device.type == "meta" for t in tensors.values()):
        raise CheckpointError("cannot save a model whose weights are still on the meta device")
    config = model.config.replace(architectures=[type(model).__name__], dtype=str(model.dtype).removeprefix("torch."))
    with AtomicDirectory(directory) as tmp:
        write_safetensors(tmp, tensors, max_bytes)
        (tmp / "config.json").write_text(config.to_json_string(), encoding="utf-8")
        generation = model.generation_config_dict()
        if generation is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")


@dataclass
class _LoadPlan:
    sources: dict[str, str] = field(default_factory=dict)  # parameter name -> checkpoint key
    new: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)


def _adapt_key(key: str, prefix: str) -> str:
    """Map a checkpoint key to this model's parameter name (backbone and head keys interchange).

    Head checkpoints say "model.layers.0..."; backbone checkpoints say "layers.0...".
    """
    backbone = key.startswith(("embed_tokens.", "layers.", "norm."))
    if prefix and backbone:
        return f"{prefix}.{key}"
    if not prefix and key.startswith("model."):
        return key.removeprefix("model.")
    return key
