"""Gemma2PreTrainedModel: the base of the backbone and the heads; weight initialisation and the
familiar from_pretrained / save_pretrained, which read and write through gemma2.io.loading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from gemma2.config import Gemma2Config

ModelT = TypeVar("ModelT", bound="Gemma2PreTrainedModel")


@dataclass
class LoadingInfo:
    """What from_pretrained did beyond a one-to-one copy."""

    newly_initialized: list[str] = field(default_factory=list)  # head weights the checkpoint lacked
    ignored: list[str] = field(default_factory=list)  # checkpoint keys this model does not use
    mismatched: list[str] = field(default_factory=list)  # re-initialised (ignore_mismatched_sizes)
    bytes_read: int = 0  # tensor data read from the checkpoint (a tensor-parallel rank: its share)


class Gemma2PreTrainedModel(nn.Module):
    """Common base of the backbone and the three heads."""

    # Where the backbone lives inside a head ("model" -> keys "model.layers.0..."); "" for the
    # backbone itself. Checkpoints of either kind load into either kind.
    base_model_prefix = "model"
    # Parameters a head adds to the backbone; a backbone checkpoint may lack them.
    head_keys: tuple[str, ...] = ()
    # The backend whose kernels it runs (gemma2.backends.apply_backend sets it): PyTorch's ops until then.
    backend = "torch"

    def __init__(self, config: Gemma2Config) -> None:
        super().__init__()
        if not isinstance(config, Gemma2Config):
            raise TypeError(f"config must be a gemma2.Gemma2Config, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.loading_info = LoadingInfo()
        # generation_config.json of the checkpoint (stop tokens, sampling defaults), {} if none.
        self.generation_config: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------
    # Initialisation (the reference's: normal(0, initializer_range), zeros for norms and biases)

    def init_weights(self) -> None:
        for module in self.modules():
            self._init_module(module)

    def _init_module(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and module.weight.device.type != "meta":
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif type(module).__name__ == "Gemma2RMSNorm":
            nn.init.zeros_(module.weight)  # type: ignore[arg-type]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        """Parameters, counting the tied embedding / LM head once."""
        seen: set[int] = set()
        total = 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    def tie_weights(self) -> None:
        """Heads with an lm_head override this to share the embedding."""

    @property
    def backbone(self) -> nn.Module:
        """The Gemma2Model inside (the model itself for Gemma2Model)."""
        return getattr(self, self.base_model_prefix) if self.base_model_prefix else self

    def get_input_embeddings(self) -> nn.Embedding:
        embedding = self.backbone.embed_tokens
        assert isinstance(embedding, nn.Embedding)
        return embedding

    def set_input_embeddings(self, embedding: nn.Embedding) -> None:
        self.backbone.embed_tokens = embedding
        self.tie_weights()

    def get_output_embeddings(self) -> nn.Linear | None:
        head = getattr(self, "lm_head", None)
        return head if isinstance(head, nn.Linear) else None

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer's activations in the backward pass instead of storing them."""
        setattr(self.backbone, "gradient_checkpointing", True)  # noqa: B010

    def gradient_checkpointing_disable(self) -> None:
        setattr(self.backbone, "gradient_checkpointing", False)  # noqa: B010

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint holds: the state dict without the tied LM head."""
        state = self.state_dict()
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
            state.pop("lm_head.weight_scale", None)  # a tied int8 head shares the embedding's scales
        return state

    # ------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_pretrained(
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
        (gemma2.backends: "auto", "cpu" or "torch"), applied last. `tp_plan="auto"`, under an
        initialised torch.distributed process group, splits the model across its ranks with
        gemma2.distributed's plan, each rank reading only its slices of the checkpoint.
        """
        from gemma2.io.loading import load_pretrained

        return load_pretrained(
            cls,
            path,
            config=config,
            dtype=dtype,
            device=device,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            torch_dtype=torch_dtype,
            quantize=quantize,
            group_size=group_size,
            backend=backend,
            tp_plan=tp_plan,
            **config_overrides,
        )

    # ------------------------------------------------------------------------------------------
    # Saving

    def save_pretrained(self, directory: str | Path, max_shard_size: int | str = "5GB") -> None:
        """Write config.json and safetensors weights (sharded with an index when over the size).

        Everything is written to a temporary directory first: a failure leaves nothing half-written.
        """
        from gemma2.io.loading import save_pretrained

        save_pretrained(self, directory, max_shard_size)

    def generation_config_dict(self) -> dict[str, Any] | None:
        """generation_config.json contents for models that generate text (the causal LM)."""
        return None
