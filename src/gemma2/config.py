"""Gemma2Config: the reference's field names, the official presets, and config.json in and out.

Field names and defaults follow transformers' Gemma2Config (defaults are the gemma-2-2b shape), so
a Hugging Face config.json loads as is. config.json files in the wild were written by transformers
4.42 through 5.x and differ in small ways (`rope_theta` vs `rope_parameters`, `torch_dtype` vs
`dtype`, `hidden_act` vs `hidden_activation`, legacy `sliding_window_size`); `from_dict` reads all
of them. `to_dict` writes one file that both transformers 4.4x and 5.x load: 5.x checks types
strictly, so float fields are written as floats and int fields as ints.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gemma2.errors import CheckpointError, ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)

# Activations transformers' ACT2FN offers that a Gemma 2 config may name. Gemma 2 itself uses
# "gelu_pytorch_tanh"; the others are accepted because fine-tunes sometimes change the field.
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu", "silu", "swish", "relu")

# Storage dtypes a config.json may name, keyed by every spelling seen in the wild.
DTYPE_NAMES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}

# Official sizes (GEMMA2.md section 1; google/gemma-2-*/config.json). query_pre_attn_scalar is
# 256 for 2B and 9B (early 9B copies said 224: wrong) and d/H = 144 for 27B, not head_dim.
PRESETS: dict[str, dict[str, Any]] = {
    "gemma-2-2b": dict(
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
    "gemma-2-9b": dict(
        hidden_size=3584,
        intermediate_size=14336,
        num_hidden_layers=42,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
    "gemma-2-27b": dict(
        hidden_size=4608,
        intermediate_size=36864,
        num_hidden_layers=46,
        num_attention_heads=32,
        num_key_value_heads=16,
        head_dim=128,
        query_pre_attn_scalar=144,
    ),
}

# Keys of config.json that are read into other fields (or describe the file) rather than kept.
_TRANSLATED_KEYS = {
    "rope_parameters",
    "rope_scaling",
    "torch_dtype",
    "dtype",
    "hidden_act",
    "sliding_window_size",
    "model_type",
    "transformers_version",
    "_name_or_path",
    # Runtime choices of transformers, not properties of the model: never written back.
    "attn_implementation",
    "_attn_implementation",
}
_INT_FIELDS = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
}
_FLOAT_FIELDS = {
    "initializer_range",
    "rms_norm_eps",
    "rope_theta",
    "attention_dropout",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "classifier_dropout",
}


@dataclass
class Gemma2Config:
    """Architecture and head settings of a Gemma 2 model (transformers' field names).

    Shape letters used across the package: B batch, T query length, S key length, H query heads,
    K key/value heads, D head_dim, d hidden_size, F intermediate_size, V vocab_size, W window.
    """

    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    attention_bias: bool = False
    attention_dropout: float = 0.0
    query_pre_attn_scalar: int | float = 256
    sliding_window: int | None = 4096
    layer_types: list[str] | None = None
    final_logit_softcapping: float | None = 30.0
    attn_logit_softcapping: float | None = 50.0
    cache_implementation: str | None = "hybrid"
    use_bidirectional_attention: bool | None = None
    # Heads (transformers keeps these on PretrainedConfig).
    num_labels: int | None = None
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    classifier_dropout: float | None = None
    # The dtype the weights are stored in ("bfloat16", "float32", ...), informational.
    dtype: str | None = None
    architectures: list[str] | None = None
    # Keys of a config.json this class has no field for, written back unchanged on save.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.layer_types is None:
            # Even layers (0, 2, ...) slide, odd layers see everything (GEMMA2.md section 2).
            self.layer_types = [SLIDING if i % 2 == 0 else FULL for i in range(self._int_field("num_hidden_layers"))]
        else:
            self.layer_types = list(self.layer_types)
        self._init_labels()
        if self.dtype is not None:
            self.dtype = _dtype_name(self.dtype, "dtype")
        self.validate()

    # ----------------------------------------------------------------------------------------
    # Validation

    def _int_field(self, name: str) -> int:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"Gemma2Config.{name} must be a positive integer, got {value!r}")
        return value

    def _init_labels(self) -> None:
        if self.id2label is not None:
            try:
                self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            except (TypeError, ValueError, AttributeError):
                raise ConfigError(
                    f"Gemma2Config.id2label must map integer ids to names, got {self.id2label!r}"
                ) from None
            if self.num_labels is not None and self.num_labels != len(self.id2label):
                raise ConfigError(
                    f"Gemma2Config.num_labels={self.num_labels!r} disagrees with id2label, which has "
                    f"{len(self.id2label)} entries"
                )
            self.num_labels = len(self.id2label)
        else:
            if self.num_labels is None:
                self.num_labels = 2
            if isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int) or self.num_labels < 1:
                raise ConfigError(f"Gemma2Config.num_labels must be a positive integer, got {self.num_labels!r}")
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        if self.label2id is None or set(self.label2id) != set(self.id2label.values()):
            self.label2id = {name: i for i, name in self.id2label.items()}
        else:
            self.label2id = {str(k): int(v) for k, v in self.label2id.items()}

    def validate(self) -> None:
        """Check every field; raise ConfigError naming the first bad field and its value."""
        for name in _INT_FIELDS:
            self._int_field(name)
        for name in ("use_cache", "tie_word_embeddings", "attention_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"Gemma2Config.{name} must be true or false, got {getattr(self, name)!r}")
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        if heads % kv_heads != 0:
            raise ConfigError(
                f"Gemma2Config.num_attention_heads={heads} is not divisible by num_key_value_heads={kv_heads}"
            )
        if self.head_dim % 2 != 0:
            raise ConfigError(
                f"Gemma2Config.head_dim must be even (rotary pairs dimension j with j + D/2), got {self.head_dim}"
            )
        if self.hidden_activation not in ACTIVATIONS:
            raise ConfigError(
                f"Gemma2Config.hidden_activation={self.hidden_activation!r} is not supported; use one of {ACTIVATIONS}"
            )
        layer_types = self.layer_types or []
        if len(layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"Gemma2Config.layer_types has {len(layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        for i, kind in enumerate(layer_types):
            if kind not in LAYER_TYPES:
                raise ConfigError(f"Gemma2Config.layer_types[{i}]={kind!r} is not one of {LAYER_TYPES}")
        if SLIDING in layer_types:
            window = self.sliding_window
            if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
                raise ConfigError(
                    f"Gemma2Config.sliding_window must be a positive integer when a layer is "
                    f"{SLIDING!r}, got {window!r}"
                )
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0:
                raise ConfigError(f"Gemma2Config.{name} must be a positive number, got {value!r}")
        scalar = self.query_pre_attn_scalar
        if not _is_number(scalar) or not scalar > 0:
            raise ConfigError(f"Gemma2Config.query_pre_attn_scalar must be a positive number, got {scalar!r}")
        for name in ("final_logit_softcapping", "attn_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not value > 0):
                raise ConfigError(f"Gemma2Config.{name} must be a positive number or None, got {value!r}")
        for name in ("attention_dropout", "classifier_dropout"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not 0 <= value < 1):
                raise ConfigError(f"Gemma2Config.{name} must be in [0, 1), got {value!r}")
        for name in ("pad_token_id", "bos_token_id"):
            self._check_token_id(name, getattr(self, name))
        eos = self.eos_token_id
        for token in eos if isinstance(eos, list) else [eos]:
            self._check_token_id("eos_token_id", token)
        if self.use_bidirectional_attention:
            raise ConfigError("Gemma2Config.use_bidirectional_attention=True is not supported: Gemma 2 is causal")
        if self.problem_type not in (None, "regression", "single_label_classification", "multi_label_classification"):
            raise ConfigError(f"Gemma2Config.problem_type={self.problem_type!r} is not a known problem type")

    def _check_token_id(self, name: str, value: Any) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
            raise ConfigError(f"Gemma2Config.{name}={value!r} is not a token id in [0, vocab_size={self.vocab_size})")

    # ----------------------------------------------------------------------------------------
    # Derived values

    @property
    def num_key_value_groups(self) -> int:
        """Query heads per key/value head (G = H / K)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rope_parameters(self) -> dict[str, Any]:
        """transformers 5.x's spelling of the rotary settings."""
        return {"rope_type": "default", "rope_theta": float(self.rope_theta)}

    @property
    def hidden_act(self) -> str:
        """transformers 4.4x's spelling of hidden_activation."""
        return self.hidden_activation

    @property
    def torch_dtype(self) -> str | None:
        return self.dtype

    def is_sliding(self, layer_idx: int) -> bool:
        assert self.layer_types is not None
        return self.layer_types[layer_idx] == SLIDING

    # ----------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Gemma2Config:
        """The official architecture of "gemma-2-2b", "gemma-2-9b" or "gemma-2-27b".

        "google/" prefixes and "-it" suffixes are accepted: instruction-tuned models share the shape.
        """
        key = name.removeprefix("google/").removesuffix("-it")
        if key not in PRESETS:
            raise ConfigError(f"Unknown Gemma 2 preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Gemma2Config:
        """Build a config from a parsed config.json of any transformers version."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type")
        if model_type is not None and model_type != "gemma2":
            raise ConfigError(
                f"{source}: model_type is {model_type!r}, not 'gemma2'; this package reads Gemma 2 checkpoints only"
            )
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key not in _TRANSLATED_KEYS:
                extra[key] = value

        # hidden_activation wins over hidden_act; 4.42 files carry both, some only one, some null.
        if kwargs.get("hidden_activation") is None:
            kwargs.pop("hidden_activation", None)
            if data.get("hidden_act") is not None:
                kwargs["hidden_activation"] = data["hidden_act"]
        # rope_parameters (5.x) carries rope_theta; a top-level rope_theta (4.x) is the same value.
        rope = data.get("rope_parameters")
        if isinstance(rope, dict):
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type != "default":
                raise ConfigError(
                    f"{source}: rope_parameters.rope_type={rope_type!r} is not supported (Gemma 2 uses 'default')"
                )
            if "rope_theta" in rope:  # transformers 5.x reads rope_parameters first, so do we
                kwargs["rope_theta"] = rope["rope_theta"]
        elif rope is not None:
            raise ConfigError(f"{source}: rope_parameters must be an object, got {rope!r}")
        scaling = data.get("rope_scaling")
        if scaling is not None:
            scaling_type = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
            if scaling_type != "default":
                raise ConfigError(f"{source}: rope_scaling={scaling!r} is not supported by Gemma 2")
        if data.get("sliding_window") is None and data.get("sliding_window_size") is not None:
            kwargs["sliding_window"] = data["sliding_window_size"]
        stored = data.get("dtype") or data.get("torch_dtype")
        if stored is not None:
            kwargs["dtype"] = _dtype_name(stored, f"{source}: dtype")
        id2label, num_labels = data.get("id2label"), data.get("num_labels")
        if isinstance(id2label, dict) and num_labels is not None and num_labels != len(id2label):
            # transformers lets num_labels win over a stale id2label (and renames the labels).
            kwargs.pop("id2label", None)
            kwargs.pop("label2id", None)
        for name in ("layer_types", "architectures"):
            if kwargs.get(name) is not None and not isinstance(kwargs[name], list):
                raise ConfigError(f"{source}: {name} must be a list, got {kwargs[name]!r}")
        for name in ("id2label", "label2id", "rope_parameters"):
            if kwargs.get(name) is not None and not isinstance(kwargs[name], dict):
                raise ConfigError(f"{source}: {name} must be an object, got {kwargs[name]!r}")

        for name in _INT_FIELDS:
            if name in kwargs:
                kwargs[name] = _as_int(kwargs[name], name, source)
        if "query_pre_attn_scalar" in kwargs:
            kwargs["query_pre_attn_scalar"] = _as_number(
                kwargs["query_pre_attn_scalar"], "query_pre_attn_scalar", source
            )
        for name in _FLOAT_FIELDS:
            if kwargs.get(name) is not None:
                kwargs[name] = float(_as_number(kwargs[name], name, source))
        if kwargs.get("sliding_window") is not None:
            kwargs["sliding_window"] = _as_int(kwargs["sliding_window"], "sliding_window", source)
        try:
            config = cls(**kwargs, extra=extra)
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None
        except TypeError as error:  # a field of the wrong JSON type, e.g. a list where a number goes
            raise ConfigError(f"{source}: {error}") from None
        return config

    @classmethod
    def from_json_file(cls, path: str | Path) -> Gemma2Config:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: cannot read config file ({error})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(
                f"{path}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
            ) from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> Gemma2Config:
        """Read a directory's config.json, a config.json file, or a hub repository's config."""
        from gemma2.io.checkpoint import resolve_checkpoint_dir

        path = Path(path)
        if path.is_file():
            config = cls.from_json_file(path)
        else:
            try:
                directory = resolve_checkpoint_dir(path, config_only=True)
            except CheckpointError as error:
                raise ConfigError(str(error)) from None
            config = cls.from_json_file(directory / "config.json")
        return config.replace(**overrides) if overrides else config

    def replace(self, **changes: Any) -> Gemma2Config:
        """A validated copy with some fields changed (unknown names raise ConfigError)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"Gemma2Config has no field {unknown[0]!r}")
        data = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        if "num_labels" in changes and "id2label" not in changes:
            data["id2label"] = data["label2id"] = None
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            data["layer_types"] = None
        data.update(changes)
        return type(self)(**data)

    # ----------------------------------------------------------------------------------------
    # Output

    def to_dict(self) -> dict[str, Any]:
        """config.json contents loadable by transformers 4.42+ and 5.x (strict types)."""
        out: dict[str, Any] = {}
        if self.architectures:
            out["architectures"] = list(self.architectures)
        out.update(
            model_type="gemma2",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_activation=self.hidden_activation,
            # 4.4x Gemma 2 read hidden_act in some code paths; both keys keep every version happy.
            hidden_act=self.hidden_activation,
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=float(self.initializer_range),
            rms_norm_eps=float(self.rms_norm_eps),
            use_cache=self.use_cache,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            bos_token_id=self.bos_token_id,
            tie_word_embeddings=self.tie_word_embeddings,
            rope_theta=float(self.rope_theta),
            rope_parameters=self.rope_parameters,
            attention_bias=self.attention_bias,
            attention_dropout=float(self.attention_dropout),
            query_pre_attn_scalar=_int_if_integral(self.query_pre_attn_scalar),
            sliding_window=self.sliding_window,
            layer_types=list(self.layer_types or []),
            final_logit_softcapping=_float_or_none(self.final_logit_softcapping),
            attn_logit_softcapping=_float_or_none(self.attn_logit_softcapping),
        )
        out["cache_implementation"] = self.cache_implementation
        if self.dtype is not None:
            out["dtype"] = self.dtype
            out["torch_dtype"] = self.dtype  # read by transformers < 5
        assert self.id2label is not None
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["label2id"] = dict(self.label2id or {})
        if self.problem_type is not None:
            out["problem_type"] = self.problem_type
        if self.classifier_dropout is not None:
            out["classifier_dropout"] = float(self.classifier_dropout)
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def to_json_file(self, path: str | Path) -> None:
        from gemma2.io.checkpoint import atomic_write_text

        atomic_write_text(Path(path), self.to_json_string())

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.to_json_file(directory / "config.json")


_dataclass_init = Gemma2Config.__init__


def _init_accepting_reference_spellings(self: Gemma2Config, *args: Any, **kwargs: Any) -> None:
    """Gemma2Config(...) also takes transformers' other spellings of fields.

    `rope_parameters=`, `torch_dtype=`, `hidden_act=`, `sliding_window_size=`... are translated
    exactly as they are when read from a config.json, so code written for either transformers 4.x
    or 5.x constructs the same config.
    """
    names = {f.name for f in fields(Gemma2Config)}
    if args or set(kwargs) <= names:
        _dataclass_init(self, *args, **kwargs)
        return
    built = Gemma2Config.from_dict(kwargs, source="Gemma2Config")
    _dataclass_init(self, **{name: getattr(built, name) for name in names})


setattr(Gemma2Config, "__init__", _init_accepting_reference_spellings)  # noqa: B010


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_number(value: Any, name: str, source: str) -> int | float:
    if not _is_number(value):
        raise ConfigError(f"{source}: {name} must be a number, got {value!r}")
    return value


def _as_int(value: Any, name: str, source: str) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{source}: {name} must be an integer, got {value!r}")
    return value


def _int_if_integral(value: int | float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _float_or_none(value: float | None) -> float | None:
    return None if value is None else float(value)


def _dtype_name(value: Any, what: str) -> str:
    text = str(value).removeprefix("torch.")
    if text not in DTYPE_NAMES:
        raise ConfigError(f"{what}={value!r} is not a known dtype; use one of {sorted(set(DTYPE_NAMES.values()))}")
    return DTYPE_NAMES[text]
