"""Gemma2Config: defaults, validation, presets, config.json in (every variant in the wild) and out.

The oracle is transformers 5.24's Gemma2Config: it must read what we write (it checks types
strictly), and where it can read a real config.json fixture, we must read the same values.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import transformers
from conftest import hf_config, tiny_config

from gemma2 import ConfigError, Gemma2Config, Gemma2Error

warnings.filterwarnings("ignore", module="transformers")

SLIDING = "sliding_attention"
FULL = "full_attention"

# ------------------------------------------------------------------------------------------------
# Realistic config.json fixtures, as the hub and the transformers versions wrote them.

# google/gemma-2-2b as written by transformers 4.42.4: both activation keys, rope_theta at the top,
# torch_dtype float32 (the weights are bf16 anyway), cache_implementation "hybrid", no layer_types.
GEMMA_2_2B_JSON = """{
  "architectures": [
    "Gemma2ForCausalLM"
  ],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "attn_logit_softcapping": 50.0,
  "bos_token_id": 2,
  "cache_implementation": "hybrid",
  "eos_token_id": 1,
  "final_logit_softcapping": 30.0,
  "head_dim": 256,
  "hidden_act": "gelu_pytorch_tanh",
  "hidden_activation": "gelu_pytorch_tanh",
  "hidden_size": 2304,
  "initializer_range": 0.02,
  "intermediate_size": 9216,
  "max_position_embeddings": 8192,
  "model_type": "gemma2",
  "num_attention_heads": 8,
  "num_hidden_layers": 26,
  "num_key_value_heads": 4,
  "pad_token_id": 0,
  "query_pre_attn_scalar": 256,
  "rms_norm_eps": 1e-06,
  "rope_theta": 10000.0,
  "sliding_window": 4096,
  "torch_dtype": "float32",
  "transformers_version": "4.42.4",
  "use_cache": true,
  "vocab_size": 256000
}
"""

# google/gemma-2-9b from the 4.42.0.dev0 era: also the legacy sliding_window_size key.
GEMMA_2_9B_JSON = """{
  "architectures": [
    "Gemma2ForCausalLM"
  ],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "attn_logit_softcapping": 50.0,
  "bos_token_id": 2,
  "cache_implementation": "hybrid",
  "eos_token_id": 1,
  "final_logit_softcapping": 30.0,
  "head_dim": 256,
  "hidden_act": "gelu_pytorch_tanh",
  "hidden_activation": "gelu_pytorch_tanh",
  "hidden_size": 3584,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 8192,
  "model_type": "gemma2",
  "num_attention_heads": 16,
  "num_hidden_layers": 42,
  "num_key_value_heads": 8,
  "pad_token_id": 0,
  "query_pre_attn_scalar": 256,
  "rms_norm_eps": 1e-06,
  "rope_theta": 10000.0,
  "sliding_window": 4096,
  "sliding_window_size": 4096,
  "torch_dtype": "float32",
  "transformers_version": "4.42.0.dev0",
  "use_cache": true,
  "vocab_size": 256000
}
"""

# google/gemma-2-9b-it: eos is a list (<eos> and <end_of_turn>), hidden_activation is null and only
# hidden_act is set.
GEMMA_2_9B_IT_JSON = """{
  "architectures": [
    "Gemma2ForCausalLM"
  ],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "attn_logit_softcapping": 50.0,
  "bos_token_id": 2,
  "cache_implementation": "hybrid",
  "eos_token_id": [
    1,
    107
  ],
  "final_logit_softcapping": 30.0,
  "head_dim": 256,
  "hidden_act": "gelu_pytorch_tanh",
  "hidden_activation": null,
  "hidden_size": 3584,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 8192,
  "model_type": "gemma2",
  "num_attention_heads": 16,
  "num_hidden_layers": 42,
  "num_key_value_heads": 8,
  "pad_token_id": 0,
  "query_pre_attn_scalar": 256,
  "rms_norm_eps": 1e-06,
  "rope_theta": 10000.0,
  "sliding_window": 4096,
  "sliding_window_size": 4096,
  "torch_dtype": "float32",
  "transformers_version": "4.42.0.dev0",
  "use_cache": true,
  "vocab_size": 256000
}
"""

# google/gemma-2-27b-it: scalar 144 = d/H, bf16, eos list.
GEMMA_2_27B_IT_JSON = """{
  "_name_or_path": "google/gemma-2-27b-it",
  "architectures": [
    "Gemma2ForCausalLM"
  ],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "attn_logit_softcapping": 50.0,
  "bos_token_id": 2,
  "cache_implementation": "hybrid",
  "eos_token_id": [
    1,
    107
  ],
  "final_logit_softcapping": 30.0,
  "head_dim": 128,
  "hidden_act": "gelu_pytorch_tanh",
  "hidden_activation": "gelu_pytorch_tanh",
  "hidden_size": 4608,
  "initializer_range": 0.02,
  "intermediate_size": 36864,
  "max_position_embeddings": 8192,
  "model_type": "gemma2",
  "num_attention_heads": 32,
  "num_hidden_layers": 46,
  "num_key_value_heads": 16,
  "pad_token_id": 0,
  "query_pre_attn_scalar": 144,
  "rms_norm_eps": 1e-06,
  "rope_theta": 10000.0,
  "sliding_window": 4096,
  "sliding_window_size": 4096,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.42.0.dev0",
  "use_cache": true,
  "vocab_size": 256000
}
"""

# A 2B-shaped file written by transformers 5.x: rope_parameters, dtype, explicit layer_types,
# use_bidirectional_attention null, no hidden_act, no cache_implementation.
GEMMA_2_2B_V5_JSON = (
    """{
  "architectures": [
    "Gemma2ForCausalLM"
  ],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "attn_logit_softcapping": 50.0,
  "bos_token_id": 2,
  "dtype": "bfloat16",
  "eos_token_id": 1,
  "final_logit_softcapping": 30.0,
  "head_dim": 256,
  "hidden_activation": "gelu_pytorch_tanh",
  "hidden_size": 2304,
  "initializer_range": 0.02,
  "intermediate_size": 9216,
  "layer_types": """
    + json.dumps([SLIDING, FULL] * 13)
    + """,
  "max_position_embeddings": 8192,
  "model_type": "gemma2",
  "num_attention_heads": 8,
  "num_hidden_layers": 26,
  "num_key_value_heads": 4,
  "pad_token_id": 0,
  "query_pre_attn_scalar": 256,
  "rms_norm_eps": 1e-06,
  "rope_parameters": {
    "rope_theta": 10000.0,
    "rope_type": "default"
  },
  "sliding_window": 4096,
  "tie_word_embeddings": true,
  "transformers_version": "5.24.0",
  "use_bidirectional_attention": null,
  "use_cache": true,
  "vocab_size": 256000
}
"""
)

# Hand-edited or tool-written: ints written as floats, floats written as ints.
GEMMA_2_2B_SLOPPY_TYPES_JSON = """{
  "model_type": "gemma2",
  "attention_dropout": 0,
  "attn_logit_softcapping": 50,
  "final_logit_softcapping": 30,
  "head_dim": 256.0,
  "hidden_size": 2304.0,
  "intermediate_size": 9216.0,
  "max_position_embeddings": 8192.0,
  "num_attention_heads": 8.0,
  "num_hidden_layers": 26.0,
  "num_key_value_heads": 4.0,
  "query_pre_attn_scalar": 256.0,
  "rope_theta": 10000,
  "sliding_window": 4096.0,
  "vocab_size": 256000.0,
  "torch_dtype": "bfloat16"
}
"""

# Files transformers 5.24 itself can read (strict types, non-null hidden_activation).
HF_READABLE_FIXTURES = {
    "gemma-2-2b": GEMMA_2_2B_JSON,
    "gemma-2-9b": GEMMA_2_9B_JSON,
    "gemma-2-27b-it": GEMMA_2_27B_IT_JSON,
    "gemma-2-2b-v5": GEMMA_2_2B_V5_JSON,
}
ALL_FIXTURES = {
    **HF_READABLE_FIXTURES,
    "gemma-2-9b-it": GEMMA_2_9B_IT_JSON,
    "sloppy-types": GEMMA_2_2B_SLOPPY_TYPES_JSON,
}

# GEMMA2.md section 1.
PRESET_TABLE = {
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
PRESET_PARAMETERS = {"gemma-2-2b": 2_614_341_888, "gemma-2-9b": 9_241_705_984, "gemma-2-27b": 27_227_128_320}
SHARED_VALUES = dict(
    vocab_size=256000,
    sliding_window=4096,
    max_position_embeddings=8192,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh",
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
    tie_word_embeddings=True,
    attention_bias=False,
    attention_dropout=0.0,
    initializer_range=0.02,
)

# Fields shared by name with transformers' Gemma2Config (rope_theta is compared separately).
ARCH_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_activation",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "eos_token_id",
    "bos_token_id",
    "tie_word_embeddings",
    "attention_bias",
    "attention_dropout",
    "query_pre_attn_scalar",
    "sliding_window",
    "layer_types",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "use_bidirectional_attention",
)
HEAD_FIELDS = ("num_labels", "id2label", "label2id", "problem_type")
INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)
FLOAT_FIELDS = ("initializer_range", "rms_norm_eps", "rope_theta", "attention_dropout")
OPTIONAL_FLOAT_FIELDS = ("final_logit_softcapping", "attn_logit_softcapping")


# ------------------------------------------------------------------------------------------------
# Helpers


def write_config(directory: Path, content: str | bytes | Any, name: str = "config.json") -> Path:
    """Write `content` (JSON text, raw bytes, or a value to serialise) as directory/name."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_text(json.dumps(content), encoding="utf-8")
    return path


def load_hf(directory: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.Gemma2Config.from_pretrained(directory)


def assert_matches_hf(ours: Gemma2Config, hf: Any) -> None:
    """Every architecture and head field of ours equals transformers' value."""
    for name in ARCH_FIELDS + HEAD_FIELDS:
        assert getattr(ours, name) == getattr(hf, name), name
    assert hf.rope_parameters["rope_type"] == "default"
    assert ours.rope_theta == hf.rope_parameters["rope_theta"]
    if ours.dtype is not None:
        assert str(hf.dtype).removeprefix("torch.") == ours.dtype


def parameter_count(c: Gemma2Config) -> int:
    """Parameters of the causal LM with a tied head, from the shapes in GEMMA2.md section 5."""
    V, d, F = c.vocab_size, c.hidden_size, c.intermediate_size
    H, K, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    attention = d * H * D + 2 * d * K * D + H * D * d  # q, k, v, o (no biases)
    mlp = 3 * d * F  # gate, up, down
    norms = 4 * d
    return V * d + c.num_hidden_layers * (attention + mlp + norms) + d


def even_sliding(n: int) -> list[str]:
    return [SLIDING if i % 2 == 0 else FULL for i in range(n)]


# ------------------------------------------------------------------------------------------------
# Defaults


def test_defaults_are_the_2b_shape():
    c = Gemma2Config()
    for name, value in {**PRESET_TABLE["gemma-2-2b"], **SHARED_VALUES}.items():
        assert getattr(c, name) == value, name
    assert c.layer_types == even_sliding(26)
    assert c.use_cache is True
    assert c.use_bidirectional_attention is None
    assert c.num_labels == 2
    assert c.id2label == {0: "LABEL_0", 1: "LABEL_1"}
    assert c.label2id == {"LABEL_0": 0, "LABEL_1": 1}
    assert c.problem_type is None
    assert c.extra == {}


def test_defaults_equal_transformers_defaults():
    assert_matches_hf(Gemma2Config(), transformers.Gemma2Config())


@pytest.mark.parametrize("layers", [1, 2, 3, 4, 7, 26, 42, 46])
def test_default_layer_types_slide_on_even_layers(layers):
    c = tiny_config(num_hidden_layers=layers)
    assert c.layer_types == even_sliding(layers)
    assert c.layer_types[0] == SLIDING
    assert [c.is_sliding(i) for i in range(layers)] == [i % 2 == 0 for i in range(layers)]
    assert c.layer_types == transformers.Gemma2Config(num_hidden_layers=layers).layer_types


def test_explicit_layer_types_are_kept_as_a_copy():
    types = (FULL, SLIDING, FULL)
    c = tiny_config(layer_types=types)
    assert c.layer_types == [FULL, SLIDING, FULL]
    assert isinstance(c.layer_types, list)
    assert [c.is_sliding(i) for i in range(3)] == [False, True, False]


def test_derived_properties():
    c = tiny_config(rope_theta=500000, dtype="torch.bfloat16", hidden_activation="gelu")
    assert c.num_key_value_groups == 2
    assert c.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}
    assert isinstance(c.rope_parameters["rope_theta"], float)
    assert c.hidden_act == "gelu"
    assert c.dtype == "bfloat16"
    assert c.torch_dtype == "bfloat16"
    assert Gemma2Config.from_preset("gemma-2-27b").num_key_value_groups == 2
    assert tiny_config(num_key_value_heads=1).num_key_value_groups == 4


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, Gemma2Error)
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError):
        tiny_config(num_key_value_heads=3)


# ------------------------------------------------------------------------------------------------
# Validation on construction


def _bad(field_name: str, value: Any, *fragments: str, **others: Any):
    """A parametrize case: constructing with field=value (and others) fails naming fragments."""
    return pytest.param({field_name: value, **others}, fragments, id=f"{field_name}={value!r}")


INVALID_CASES = [
    # Sizes must be positive integers.
    *[_bad(name, value, name, repr(value)) for name in INT_FIELDS for value in (0, -1, 2.5, "64", True, None)],
    # Heads must divide into key/value groups.
    _bad("num_key_value_heads", 3, "num_attention_heads=4", "num_key_value_heads=3"),
    _bad("num_key_value_heads", 8, "num_attention_heads=4", "num_key_value_heads=8"),
    _bad("num_attention_heads", 6, "num_attention_heads=6", "num_key_value_heads=4", num_key_value_heads=4),
    _bad("num_attention_heads", 3, "num_attention_heads=3", "num_key_value_heads=2"),
    # Rotary pairs dimension j with j + D/2.
    _bad("head_dim", 13, "head_dim", "13"),
    # Activations.
    _bad("hidden_activation", "swiglu", "hidden_activation", "'swiglu'"),
    _bad("hidden_activation", "gelu_tanh", "hidden_activation", "'gelu_tanh'"),
    _bad("hidden_activation", None, "hidden_activation", "None"),
    # layer_types: length and names.
    _bad("layer_types", [SLIDING, FULL], "layer_types", "2", "3"),
    _bad("layer_types", [SLIDING] * 4, "layer_types", "4", "3"),
    _bad("layer_types", [], "layer_types", "0", "3"),
    _bad("layer_types", [SLIDING, "global", FULL], "layer_types[1]", "'global'"),
    _bad("layer_types", [SLIDING, FULL, "sliding"], "layer_types[2]", "'sliding'"),
    _bad("layer_types", ["local", FULL, SLIDING], "layer_types[0]", "'local'"),
    _bad("layer_types", [SLIDING, FULL, None], "layer_types[2]", "None"),
    # A sliding layer needs a window.
    _bad("sliding_window", None, "sliding_window", "None"),
    _bad("sliding_window", 0, "sliding_window", "0"),
    _bad("sliding_window", -4096, "sliding_window", "-4096"),
    _bad("sliding_window", 4.5, "sliding_window", "4.5"),
    _bad("sliding_window", "4096", "sliding_window", "'4096'"),
    _bad("sliding_window", True, "sliding_window", "True"),
    _bad("sliding_window", None, "sliding_window", "None", layer_types=[FULL, FULL, SLIDING]),
    # Positive numbers.
    *[
        _bad(name, value, name, repr(value))
        for name in ("rms_norm_eps", "rope_theta", "initializer_range", "query_pre_attn_scalar")
        for value in (0, -1.0, math.nan, math.inf, "1.0", None, True)
    ],
    # Positive or None.
    *[
        _bad(name, value, name, repr(value))
        for name in OPTIONAL_FLOAT_FIELDS
        for value in (0, 0.0, -30.0, math.nan, "30.0", [30.0])
    ],
    # Dropout in [0, 1).
    *[
        _bad(name, value, name, repr(value))
        for name in ("attention_dropout", "classifier_dropout")
        for value in (1.0, 1, -0.1, 1.5, "0.1", math.nan)
    ],
    # Token ids inside the vocabulary (tiny vocab: 97).
    *[
        _bad(name, value, name, repr(value))
        for name in ("pad_token_id", "bos_token_id", "eos_token_id")
        for value in (-1, 97, 1000, "1", 1.0, True)
    ],
    _bad("eos_token_id", [1, 97], "eos_token_id", "97"),
    _bad("eos_token_id", [1, -5], "eos_token_id", "-5"),
    _bad("eos_token_id", [1, "107"], "eos_token_id", "'107'"),
    # Gemma 2 is causal.
    _bad("use_bidirectional_attention", True, "use_bidirectional_attention", "True"),
    # Heads.
    _bad("problem_type", "classification", "problem_type", "'classification'"),
    _bad("num_labels", 0, "num_labels", "0"),
    _bad("num_labels", -3, "num_labels", "-3"),
    _bad("num_labels", "3", "num_labels", "'3'"),
    _bad("num_labels", 2.0, "num_labels", "2.0"),
    _bad("num_labels", 3, "num_labels=3", "id2label", id2label={0: "neg", 1: "pos"}),
    _bad("id2label", {"a": "neg"}, "id2label", "'a'"),
    _bad("id2label", ["neg", "pos"], "id2label", "['neg', 'pos']"),
    # dtype names.
    _bad("dtype", "int8", "dtype", "'int8'"),
    _bad("dtype", "bfloat17", "dtype", "'bfloat17'"),
    _bad("dtype", "float8_e4m3fn", "dtype", "'float8_e4m3fn'"),
]


@pytest.mark.parametrize(("fields", "fragments"), INVALID_CASES)
def test_invalid_values_raise_config_error_naming_field_and_value(fields, fragments):
    with pytest.raises(ConfigError) as info:
        tiny_config(**fields)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize(
    "field_name",
    ["use_cache", "tie_word_embeddings", "attention_bias"],
)
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_boolean_fields_reject_non_booleans(field_name, value):
    # transformers 5.24 refuses a config.json whose bool fields hold anything else, so a config
    # that accepted them would write a file the reference cannot load.
    with pytest.raises(ConfigError) as info:
        tiny_config(**{field_name: value})
    assert field_name in str(info.value)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(dict(num_key_value_heads=4), id="multi-head (K = H)"),
        pytest.param(dict(num_key_value_heads=1), id="multi-query (K = 1)"),
        pytest.param(dict(layer_types=[FULL] * 3, sliding_window=None), id="all full, no window"),
        pytest.param(dict(final_logit_softcapping=None), id="no final cap"),
        pytest.param(dict(attn_logit_softcapping=None), id="no attention cap"),
        pytest.param(dict(eos_token_id=[1, 96]), id="eos list"),
        pytest.param(dict(eos_token_id=None, pad_token_id=None, bos_token_id=None), id="no special ids"),
        pytest.param(dict(query_pre_attn_scalar=144.0), id="float scalar"),
        pytest.param(dict(query_pre_attn_scalar=12.5), id="fractional scalar"),
        pytest.param(dict(attention_dropout=0.0, classifier_dropout=0.999), id="dropout bounds"),
        pytest.param(dict(hidden_activation="gelu"), id="gelu"),
        pytest.param(dict(hidden_activation="silu"), id="silu"),
        pytest.param(dict(num_labels=1, problem_type="regression"), id="regression"),
        pytest.param(dict(problem_type="multi_label_classification"), id="multi-label"),
        pytest.param(dict(dtype="fp16"), id="dtype fp16"),
        pytest.param(dict(sliding_window=1), id="window 1"),
        pytest.param(dict(rope_theta=1_000_000), id="int rope_theta"),
        pytest.param(dict(use_bidirectional_attention=False), id="bidirectional False"),
    ],
)
def test_valid_edge_values_are_accepted(fields):
    c = tiny_config(**fields)
    for name, value in fields.items():
        if name == "dtype":
            assert c.dtype == "float16"
        else:
            assert getattr(c, name) == value, name


def test_first_bad_field_is_named_even_with_others_valid():
    with pytest.raises(ConfigError, match="sliding_window") as info:
        tiny_config(sliding_window=0, layer_types=[FULL, SLIDING, FULL])
    assert "sliding_attention" in str(info.value)


# ------------------------------------------------------------------------------------------------
# Presets


PRESET_SPELLINGS = [
    (spelling.format(size=size), f"gemma-2-{size}")
    for size in ("2b", "9b", "27b")
    for spelling in ("gemma-2-{size}", "google/gemma-2-{size}", "gemma-2-{size}-it", "google/gemma-2-{size}-it")
]


@pytest.mark.parametrize(("spelling", "preset"), PRESET_SPELLINGS)
def test_presets_match_the_official_sizes(spelling, preset):
    c = Gemma2Config.from_preset(spelling)
    for name, value in {**PRESET_TABLE[preset], **SHARED_VALUES}.items():
        assert getattr(c, name) == value, name
    assert c.layer_types == even_sliding(c.num_hidden_layers)
    # H*D differs from d in every Gemma 2.
    assert c.num_attention_heads * c.head_dim != c.hidden_size


def test_27b_scalar_is_hidden_over_heads_not_head_dim():
    c = Gemma2Config.from_preset("gemma-2-27b")
    assert c.query_pre_attn_scalar == c.hidden_size // c.num_attention_heads == 144
    assert c.query_pre_attn_scalar != c.head_dim
    # The early 9B copies said 224: the preset must not.
    assert Gemma2Config.from_preset("google/gemma-2-9b-it").query_pre_attn_scalar == 256


@pytest.mark.parametrize("preset", sorted(PRESET_PARAMETERS))
def test_preset_parameter_counts(preset):
    assert parameter_count(Gemma2Config.from_preset(preset)) == PRESET_PARAMETERS[preset]


def test_parameter_count_formula_matches_transformers_on_a_tiny_model():
    # Checks the arithmetic used for the presets against a real (tiny) model; tied head counted once.
    model = transformers.Gemma2ForCausalLM(hf_config(tiny_config()))
    assert sum(p.numel() for p in model.parameters()) == parameter_count(tiny_config())


@pytest.mark.parametrize(
    ("preset", "fixture"),
    [("gemma-2-2b", GEMMA_2_2B_JSON), ("gemma-2-9b", GEMMA_2_9B_JSON), ("gemma-2-27b", GEMMA_2_27B_IT_JSON)],
)
def test_presets_equal_the_hub_config_files(preset, fixture):
    from_file = Gemma2Config.from_dict(json.loads(fixture))
    from_preset = Gemma2Config.from_preset(preset)
    for name in ARCH_FIELDS:
        if name == "eos_token_id":
            continue  # instruction-tuned files also stop on <end_of_turn>
        assert getattr(from_preset, name) == getattr(from_file, name), name
    assert from_preset.rope_theta == from_file.rope_theta


def test_preset_overrides_are_validated_and_resize_layer_types():
    c = Gemma2Config.from_preset("gemma-2-9b", num_hidden_layers=3, dtype="bf16")
    assert c.hidden_size == 3584
    assert c.num_hidden_layers == 3
    assert c.layer_types == even_sliding(3)
    assert c.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="num_key_value_heads=5"):
        Gemma2Config.from_preset("gemma-2-9b", num_key_value_heads=5)


@pytest.mark.parametrize("name", ["gemma-2-7b", "gemma-7b", "gemma-3-1b", "google/gemma-2-2b-pt", "", "2b"])
def test_unknown_preset_raises_naming_it(name):
    with pytest.raises(ConfigError) as info:
        Gemma2Config.from_preset(name)
    assert repr(name) in str(info.value)
    assert "gemma-2-2b" in str(info.value)  # lists the choices


def test_presets_are_independent_copies():
    a = Gemma2Config.from_preset("gemma-2-2b")
    a.layer_types[0] = FULL
    assert Gemma2Config.from_preset("gemma-2-2b").layer_types[0] == SLIDING


# ------------------------------------------------------------------------------------------------
# Reading config.json files from the wild


@pytest.mark.parametrize("name", sorted(HF_READABLE_FIXTURES))
def test_reads_hub_files_like_transformers(tmp_path, name):
    write_config(tmp_path, HF_READABLE_FIXTURES[name])
    assert_matches_hf(Gemma2Config.from_pretrained(tmp_path), load_hf(tmp_path))


@pytest.mark.parametrize("name", sorted(ALL_FIXTURES))
def test_directory_and_file_path_read_the_same(tmp_path, name):
    path = write_config(tmp_path, ALL_FIXTURES[name])
    assert Gemma2Config.from_pretrained(tmp_path) == Gemma2Config.from_pretrained(path)
    assert Gemma2Config.from_pretrained(str(path)) == Gemma2Config.from_json_file(path)


def test_reads_files_written_by_transformers_5(tmp_path):
    hf = transformers.Gemma2Config(
        **{**PRESET_TABLE["gemma-2-9b"], "num_hidden_layers": 5},
        layer_types=[FULL, SLIDING, SLIDING, FULL, SLIDING],
        sliding_window=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        final_logit_softcapping=None,
        eos_token_id=[1, 107],
        dtype="bfloat16",
    )
    hf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_theta" not in written  # the file really is the 5.x shape
    ours = Gemma2Config.from_pretrained(tmp_path)
    assert_matches_hf(ours, hf)
    assert ours.rope_theta == 50000.0
    assert ours.dtype == "bfloat16"
    assert ours.extra == {}


def test_4_42_file_values(tmp_path):
    c = Gemma2Config.from_pretrained(write_config(tmp_path, GEMMA_2_9B_JSON))
    assert c.hidden_activation == "gelu_pytorch_tanh"
    assert c.cache_implementation == "hybrid"
    assert c.dtype == "float32"
    assert c.sliding_window == 4096
    assert c.architectures == ["Gemma2ForCausalLM"]
    assert c.layer_types == even_sliding(42)
    # Keys that are translated or describe the file do not leak into extra.
    assert c.extra == {}


def test_hidden_activation_null_falls_back_to_hidden_act(tmp_path):
    c = Gemma2Config.from_pretrained(write_config(tmp_path, GEMMA_2_9B_IT_JSON))
    assert c.hidden_activation == "gelu_pytorch_tanh"
    assert c.eos_token_id == [1, 107]
    assert c.num_attention_heads == 16


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"hidden_act": "gelu"}, "gelu"),
        ({"hidden_activation": "gelu"}, "gelu"),
        ({"hidden_activation": None, "hidden_act": "gelu_new"}, "gelu_new"),
        ({"hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu"}, "gelu_pytorch_tanh"),
        ({"hidden_activation": None, "hidden_act": None}, "gelu_pytorch_tanh"),
        ({"hidden_activation": None}, "gelu_pytorch_tanh"),
        ({}, "gelu_pytorch_tanh"),
    ],
)
def test_activation_key_precedence(keys, expected):
    assert Gemma2Config.from_dict({"model_type": "gemma2", **keys}).hidden_activation == expected


def test_unsupported_activation_in_file_names_file_and_value(tmp_path):
    path = write_config(tmp_path, {"model_type": "gemma2", "hidden_act": "swiglu"})
    with pytest.raises(ConfigError) as info:
        Gemma2Config.from_pretrained(path)
    assert str(path) in str(info.value)
    assert "'swiglu'" in str(info.value)


def test_sloppy_numeric_types_are_normalised(tmp_path):
    c = Gemma2Config.from_pretrained(write_config(tmp_path, GEMMA_2_2B_SLOPPY_TYPES_JSON))
    reference = Gemma2Config.from_dict(json.loads(GEMMA_2_2B_JSON))
    for name in ARCH_FIELDS:
        assert getattr(c, name) == getattr(reference, name), name
    for name in (*INT_FIELDS, "sliding_window"):
        assert type(getattr(c, name)) is int, name
    for name in (*FLOAT_FIELDS, *OPTIONAL_FLOAT_FIELDS):
        assert type(getattr(c, name)) is float, name
    assert c.dtype == "bfloat16"


@pytest.mark.parametrize("name", [*INT_FIELDS, "sliding_window"])
@pytest.mark.parametrize("value", [2.5, "64", True, [64]])
def test_non_integral_ints_in_file_name_file_field_and_value(tmp_path, name, value):
    path = write_config(tmp_path, {"model_type": "gemma2", name: value})
    with pytest.raises(ConfigError) as info:
        Gemma2Config.from_pretrained(path)
    message = str(info.value)
    assert str(path) in message
    assert name in message
    assert repr(value) in message


@pytest.mark.parametrize("name", [*FLOAT_FIELDS, *OPTIONAL_FLOAT_FIELDS, "query_pre_attn_scalar"])
@pytest.mark.parametrize("value", ["30.0", True, [30.0], {"value": 30.0}])
def test_non_numeric_floats_in_file_name_file_field_and_value(tmp_path, name, value):
    path = write_config(tmp_path, {"model_type": "gemma2", name: value})
    with pytest.raises(ConfigError) as info:
        Gemma2Config.from_pretrained(path)
    message = str(info.value)
    assert str(path) in message
    assert name in message
    assert repr(value) in message


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({"num_attention_heads": 8, "num_key_value_heads": 3}, ["num_key_value_heads=3"]),
        ({"num_hidden_layers": 3, "layer_types": [SLIDING, FULL]}, ["layer_types", "num_hidden_layers"]),
        ({"layer_types": ["sliding_attention", "chunked_attention"] * 13}, ["layer_types[1]", "chunked_attention"]),
        ({"sliding_window": None}, ["sliding_window", "None"]),
        ({"eos_token_id": [1, 256000]}, ["eos_token_id", "256000"]),
        ({"use_bidirectional_attention": True}, ["use_bidirectional_attention"]),
        ({"head_dim": 255}, ["head_dim", "255"]),
        ({"num_labels": 0}, ["num_labels", "0"]),
    ],
)
def test_invalid_values_in_file_name_file_and_field(tmp_path, data, fragments):
    path = write_config(tmp_path, {**json.loads(GEMMA_2_2B_JSON), **data})
    with pytest.raises(ConfigError) as info:
        Gemma2Config.from_pretrained(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize(
    ("data", "field_name"),
    [
        ({"layer_types": 5}, "layer_types"),
        ({"layer_types": None, "num_hidden_layers": 2, "label2id": 5}, "label2id"),
        ({"id2label": 5}, "id2label"),
        ({"eos_token_id": {"a": 1}}, "eos_token_id"),
    ],
)
def test_wrong_json_types_name_the_field(data, field_name):
    with pytest.raises(ConfigError) as info:
        Gemma2Config.from_dict({"model_type": "gemma2", **data}, source="some/config.json")
    assert "some/config.json" in str(info.value)
    assert field_name in str(info.value), str(info.value)


def test_legacy_sliding_window_size_is_read():
    data = {"model_type": "gemma2", "sliding_window_size": 2048}
    assert Gemma2Config.from_dict(data).sliding_window == 2048
    assert Gemma2Config.from_dict({**data, "sliding_window": None}).sliding_window == 2048
    # sliding_window wins when both are set.
    assert Gemma2Config.from_dict({**data, "sliding_window": 1024}).sliding_window == 1024
    assert Gemma2Config.from_dict({"sliding_window_size": 512.0}).sliding_window == 512
    assert "sliding_window_size" not in Gemma2Config.from_dict(data).extra


@pytest.mark.parametrize(
    ("data", "theta"),
    [
        ({"rope_theta": 10000.0}, 10000.0),
        ({"rope_theta": 10000}, 10000.0),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}, 1000000.0),
        ({"rope_parameters": {"type": "default", "rope_theta": 20000}}, 20000.0),
        ({"rope_parameters": {"rope_theta": 30000.0}}, 30000.0),
        ({"rope_parameters": {"rope_type": "default"}}, 10000.0),
        ({"rope_parameters": None, "rope_theta": 40000.0}, 40000.0),
        ({"rope_scaling": None, "rope_theta": 50000.0}, 50000.0),
        ({"rope_scaling": {"rope_type": "default"}, "rope_theta": 60000.0}, 60000.0),
        ({"rope_scaling": {"type": "default"}}, 10000.0),
        ({"rope_theta": 70000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 70000.0}}, 70000.0),
    ],
)
def test_rope_theta_spellings(data, theta):
    c = Gemma2Config.from_dict({"model_type": "gemma2", **data})
    assert c.rope_theta == theta
    assert type(c.rope_theta) is float
    assert c.rope_parameters == {"rope_type": "default", "rope_theta": theta}
    assert "rope_parameters" not in c.extra and "rope_scaling" not in c.extra


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "linear"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "llama3"),
        ({"rope_parameters": {"type": "linear", "factor": 2.0}}, "linear"),
        ({"rope_parameters": "default"}, "rope_parameters"),
        ({"rope_parameters": [10000.0]}, "rope_parameters"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
        ({"rope_scaling": {"rope_type": "longrope"}}, "longrope"),
        ({"rope_scaling": "linear"}, "linear"),
    ],
)
def test_rope_scaling_other_than_default_is_refused(tmp_path, data, fragment):
    path = write_config(tmp_path, {"model_type": "gemma2", **data})
    with pytest.raises(ConfigError) as info:
        Gemma2Config.from_pretrained(path)
    message = str(info.value)
    assert str(path) in message
    assert fragment in message
    assert "rope" in message


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        ("bfloat16", "bfloat16"),
        ("torch.bfloat16", "bfloat16"),
        ("bf16", "bfloat16"),
        ("float32", "float32"),
        ("torch.float32", "float32"),
        ("fp32", "float32"),
        ("float", "float32"),
        ("float16", "float16"),
        ("fp16", "float16"),
        ("half", "float16"),
    ],
)
@pytest.mark.parametrize("key", ["torch_dtype", "dtype"])
def test_dtype_spellings(key, stored, expected):
    c = Gemma2Config.from_dict({"model_type": "gemma2", key: stored})
    assert c.dtype == expected
    assert c.torch_dtype == expected
    assert key not in c.extra
    assert Gemma2Config(dtype=stored).dtype == expected


def test_dtype_key_wins_over_torch_dtype():
    c = Gemma2Config.from_dict({"torch_dtype": "float32", "dtype": "bfloat16"})
    assert c.dtype == "bfloat16"


def test_no_dtype_means_none():
    assert Gemma2Config.from_dict({"model_type": "gemma2"}).dtype is None
    assert Gemma2Config.from_dict({"torch_dtype": None}).dtype is None


@pytest.mark.parametrize("key", ["torch_dtype", "dtype"])
@pytest.mark.parametrize("stored", ["int8", "bfloat17", "float8_e4m3fn", "auto-ish", 16])
def test_unknown_dtype_in_file_names_file_and_value(tmp_path, key, stored):
    path = write_config(tmp_path, {"model_type": "gemma2", key: stored})
    with pytest.raises(ConfigError) as info:
        Gemma2Config.from_pretrained(path)
    message = str(info.value)
    assert str(path) in message
    assert "dtype" in message
    assert repr(stored) in message


@pytest.mark.parametrize("model_type", ["gemma", "gemma3_text", "gemma3", "llama", "mistral", "recurrent_gemma", ""])
def test_other_model_types_are_refused(tmp_path, model_type):
    data = {**json.loads(GEMMA_2_2B_JSON), "model_type": model_type}
    path = write_config(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        Gemma2Config.from_pretrained(path)
    message = str(info.value)
    assert str(path) in message
    assert repr(model_type) in message
    assert "gemma2" in message


def test_missing_model_type_is_accepted():
    data = json.loads(GEMMA_2_2B_JSON)
    del data["model_type"]
    assert Gemma2Config.from_dict(data) == Gemma2Config.from_dict(json.loads(GEMMA_2_2B_JSON))


# ------------------------------------------------------------------------------------------------
# Bad files


def test_directory_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        Gemma2Config.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)
    assert "not found" in str(info.value)


def test_missing_config_json_path(tmp_path):
    path = tmp_path / "nowhere" / "config.json"
    with pytest.raises(ConfigError) as info:
        Gemma2Config.from_pretrained(path)
    assert str(path) in str(info.value)


def test_missing_directory(tmp_path):
    path = tmp_path / "no-such-model"
    with pytest.raises(ConfigError) as info:
        Gemma2Config.from_pretrained(path)
    assert str(path) in str(info.value)


def test_from_json_file_missing(tmp_path):
    path = tmp_path / "config.json"
    with pytest.raises(ConfigError) as info:
        Gemma2Config.from_json_file(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        '{"vocab_size": 256000,}',
        "{'model_type': 'gemma2'}",
        '{"model_type": "gemma2"} trailing',
        "model_type: gemma2",
        '{"vocab_size": NaN-}',
    ],
)
def test_invalid_json_names_the_file(tmp_path, text):
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        Gemma2Config.from_pretrained(tmp_path)
    assert str(path) in str(info.value)
    assert "JSON" in str(info.value)
    assert "line" in str(info.value)


def test_undecodable_file_names_the_file(tmp_path):
    path = write_config(tmp_path, b'{"model_type": "gemma2\xff\xfe"}')
    with pytest.raises(ConfigError) as info:
        Gemma2Config.from_pretrained(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("text", "type_name"),
    [("[1, 2]", "list"), ('"gemma2"', "str"), ("null", "NoneType"), ("42", "int"), ("true", "bool"), ("2.5", "float")],
)
def test_non_object_json_names_the_file(tmp_path, text, type_name):
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        Gemma2Config.from_pretrained(path)
    message = str(info.value)
    assert str(path) in message
    assert "JSON object" in message
    assert type_name in message


def test_from_dict_default_source_label():
    with pytest.raises(ConfigError, match=r"^config: .*num_key_value_heads=3"):
        Gemma2Config.from_dict({"num_key_value_heads": 3})
    with pytest.raises(ConfigError, match=r"^my.json: expected a JSON object, got list"):
        Gemma2Config.from_dict([], source="my.json")


def test_from_pretrained_applies_overrides(tmp_path):
    write_config(tmp_path, GEMMA_2_2B_V5_JSON)
    c = Gemma2Config.from_pretrained(tmp_path, num_hidden_layers=3, num_labels=5, dtype="fp32")
    assert c.num_hidden_layers == 3
    assert c.layer_types == even_sliding(3)  # the file's 26-entry list is dropped, not kept
    assert c.num_labels == 5
    assert c.id2label == {i: f"LABEL_{i}" for i in range(5)}
    assert c.dtype == "float32"
    assert c.hidden_size == 2304
    with pytest.raises(ConfigError, match="no field 'num_layers'"):
        Gemma2Config.from_pretrained(tmp_path, num_layers=3)


# ------------------------------------------------------------------------------------------------
# Labels


def test_num_labels_without_id2label_in_file():
    c = Gemma2Config.from_dict({"model_type": "gemma2", "num_labels": 3})
    assert c.num_labels == 3
    assert c.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert c.label2id == {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}


def test_id2label_with_string_keys_from_file():
    data = {
        "model_type": "gemma2",
        "id2label": {"0": "negative", "1": "neutral", "2": "positive"},
        "label2id": {"negative": 0, "neutral": 1, "positive": 2},
        "num_labels": 3,
        "problem_type": "single_label_classification",
    }
    c = Gemma2Config.from_dict(data)
    assert c.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert c.label2id == {"negative": 0, "neutral": 1, "positive": 2}
    assert c.num_labels == 3
    assert c.problem_type == "single_label_classification"
    assert "num_labels" not in c.extra


def test_num_labels_consistent_with_id2label_in_file():
    c = Gemma2Config.from_dict({"id2label": {"0": "a", "1": "b", "2": "c", "3": "d"}, "num_labels": 4})
    assert c.num_labels == 4
    assert c.label2id == {"a": 0, "b": 1, "c": 2, "d": 3}


def test_num_labels_wins_over_a_stale_id2label_in_a_file_as_in_transformers(tmp_path):
    data = {"id2label": {"0": "a", "1": "b", "2": "c", "3": "d"}, "num_labels": 2, "num_hidden_layers": 2}
    ours = Gemma2Config.from_dict(data, source="f.json")
    (tmp_path / "config.json").write_text(json.dumps({**data, "model_type": "gemma2"}))
    theirs = transformers.Gemma2Config.from_pretrained(tmp_path)
    assert ours.num_labels == theirs.num_labels == 2
    assert ours.id2label == {int(k): v for k, v in theirs.id2label.items()}


def test_label2id_that_disagrees_with_id2label_is_rebuilt():
    c = tiny_config(id2label={0: "neg", 1: "pos"}, label2id={"LABEL_0": 0, "LABEL_1": 1})
    assert c.label2id == {"neg": 0, "pos": 1}


def test_num_labels_and_id2label_constructor():
    c = tiny_config(num_labels=3)
    assert c.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    c = tiny_config(id2label={"0": "x", "1": "y"})
    assert c.num_labels == 2
    assert c.id2label == {0: "x", 1: "y"}
    assert c.label2id == {"x": 0, "y": 1}


# ------------------------------------------------------------------------------------------------
# replace


def test_replace_returns_a_changed_copy():
    a = tiny_config()
    b = a.replace(sliding_window=7, final_logit_softcapping=None)
    assert b is not a
    assert (b.sliding_window, b.final_logit_softcapping) == (7, None)
    assert (a.sliding_window, a.final_logit_softcapping) == (5, 30.0)
    assert b.replace(sliding_window=5, final_logit_softcapping=30.0) == a


def test_replace_with_no_changes_is_an_equal_copy():
    a = tiny_config(layer_types=[FULL, SLIDING, SLIDING], id2label={0: "n", 1: "p"}, extra={"k": [1]})
    b = a.replace()
    assert b == a
    assert b is not a
    b.layer_types[0] = SLIDING
    b.extra["k"].append(2)
    b.id2label[0] = "changed"
    assert a.layer_types[0] == FULL
    assert a.extra == {"k": [1]}
    assert a.id2label[0] == "n"


def test_replace_num_hidden_layers_rebuilds_default_layer_types():
    c = tiny_config(layer_types=[FULL, FULL, FULL], sliding_window=None).replace(num_hidden_layers=4, sliding_window=3)
    assert c.layer_types == even_sliding(4)
    c = tiny_config().replace(num_hidden_layers=2, layer_types=[FULL, SLIDING])
    assert c.layer_types == [FULL, SLIDING]


def test_replace_num_labels_rebuilds_labels():
    c = tiny_config(id2label={0: "neg", 1: "pos"}).replace(num_labels=3)
    assert c.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert c.label2id == {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        (dict(num_key_value_heads=3), ["num_key_value_heads=3"]),
        (dict(layer_types=[SLIDING]), ["layer_types", "1"]),
        (dict(sliding_window=0), ["sliding_window", "0"]),
        (dict(vocab_size=-5), ["vocab_size", "-5"]),
        (dict(hidden_activation="tanh"), ["hidden_activation", "'tanh'"]),
        (dict(vocab_size=2), ["bos_token_id=2", "vocab_size=2"]),
    ],
)
def test_replace_validates(changes, fragments):
    original = tiny_config()
    with pytest.raises(ConfigError) as info:
        original.replace(**changes)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert original == tiny_config()


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        (dict(num_layers=4), "num_layers"),
        (dict(hidden_dim=64), "hidden_dim"),
        (dict(rope_parameters={"rope_theta": 1.0}), "rope_parameters"),
        (dict(torch_dtype="bfloat16"), "torch_dtype"),
        (dict(sliding_window=3, zzz=1, aaa=2), "aaa"),
    ],
)
def test_replace_unknown_field_raises(changes, named):
    with pytest.raises(ConfigError) as info:
        tiny_config().replace(**changes)
    assert repr(named) in str(info.value)


# ------------------------------------------------------------------------------------------------
# Writing config.json that transformers 5.24 loads


def _roundtrip_configs() -> list[Any]:
    return [
        pytest.param(lambda: Gemma2Config(), id="default"),
        pytest.param(lambda: Gemma2Config.from_preset("gemma-2-2b"), id="2b"),
        pytest.param(lambda: Gemma2Config.from_preset("gemma-2-9b"), id="9b"),
        pytest.param(lambda: Gemma2Config.from_preset("gemma-2-27b"), id="27b"),
        pytest.param(lambda: tiny_config(), id="tiny"),
        pytest.param(lambda: tiny_config(final_logit_softcapping=None), id="no-final-cap"),
        pytest.param(lambda: tiny_config(attn_logit_softcapping=None, final_logit_softcapping=None), id="no-caps"),
        pytest.param(lambda: tiny_config(layer_types=[FULL, SLIDING, FULL]), id="explicit-layer-types"),
        pytest.param(lambda: tiny_config(layer_types=[FULL] * 3, sliding_window=None), id="all-full"),
        pytest.param(
            lambda: tiny_config(
                id2label={0: "negative", 1: "neutral", 2: "positive"},
                num_labels=3,
                problem_type="single_label_classification",
            ),
            id="num-labels-3",
        ),
        pytest.param(lambda: tiny_config(num_labels=1, problem_type="regression"), id="regression"),
        pytest.param(lambda: tiny_config(eos_token_id=[1, 7], pad_token_id=None, dtype="bf16"), id="eos-list"),
        pytest.param(
            lambda: tiny_config(
                rope_theta=10000,
                final_logit_softcapping=30,
                attn_logit_softcapping=50,
                rms_norm_eps=1,
                initializer_range=1,
                attention_dropout=0,
                query_pre_attn_scalar=20.0,
            ),
            id="floats-given-as-ints",
        ),
        pytest.param(lambda: tiny_config(hidden_activation="gelu", use_cache=False, attention_bias=True), id="flags"),
        pytest.param(lambda: tiny_config(tie_word_embeddings=False), id="untied"),
        pytest.param(lambda: tiny_config(cache_implementation="static"), id="static-cache"),
        pytest.param(lambda: Gemma2Config.from_dict(json.loads(GEMMA_2_9B_JSON)), id="read-4.42-9b"),
        pytest.param(lambda: Gemma2Config.from_dict(json.loads(GEMMA_2_9B_IT_JSON)), id="read-9b-it-null-act"),
        pytest.param(lambda: Gemma2Config.from_dict(json.loads(GEMMA_2_27B_IT_JSON)), id="read-27b-it"),
        pytest.param(lambda: Gemma2Config.from_dict(json.loads(GEMMA_2_2B_V5_JSON)), id="read-5.x"),
        pytest.param(lambda: Gemma2Config.from_dict(json.loads(GEMMA_2_2B_SLOPPY_TYPES_JSON)), id="read-sloppy"),
    ]


@pytest.mark.parametrize("make", _roundtrip_configs())
def test_save_pretrained_is_loadable_by_transformers(tmp_path, make):
    ours = make()
    ours.save_pretrained(tmp_path)
    assert_matches_hf(ours, load_hf(tmp_path))


@pytest.mark.parametrize("make", _roundtrip_configs())
def test_to_json_string_is_loadable_by_transformers(tmp_path, make):
    ours = make()
    (tmp_path / "config.json").write_text(ours.to_json_string(), encoding="utf-8")
    assert_matches_hf(ours, load_hf(tmp_path))


@pytest.mark.parametrize("make", _roundtrip_configs())
def test_save_then_load_is_identity(tmp_path, make):
    ours = make()
    ours.save_pretrained(tmp_path)
    assert Gemma2Config.from_pretrained(tmp_path) == ours
    assert Gemma2Config.from_dict(json.loads(ours.to_json_string())) == ours


@pytest.mark.parametrize("make", _roundtrip_configs())
def test_written_types_are_strict(make):
    ours = make()
    data = json.loads(ours.to_json_string())
    for name in INT_FIELDS:
        assert type(data[name]) is int, name
    for name in FLOAT_FIELDS:
        assert type(data[name]) is float, name
    for name in OPTIONAL_FLOAT_FIELDS:
        assert data[name] is None or type(data[name]) is float, name
    assert type(data["query_pre_attn_scalar"]) is int
    assert data["sliding_window"] is None or type(data["sliding_window"]) is int
    assert type(data["rope_parameters"]["rope_theta"]) is float
    for name in ("use_cache", "tie_word_embeddings", "attention_bias"):
        assert type(data[name]) is bool, name


def test_written_file_has_every_version_spelling():
    c = tiny_config(dtype="bf16", architectures=["Gemma2ForCausalLM"])
    text = c.to_json_string()
    assert text.endswith("\n")
    data = json.loads(text)
    assert data["model_type"] == "gemma2"
    assert data["architectures"] == ["Gemma2ForCausalLM"]
    assert data["hidden_activation"] == data["hidden_act"] == "gelu_pytorch_tanh"
    assert data["rope_theta"] == 10000.0
    assert data["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert data["dtype"] == data["torch_dtype"] == "bfloat16"
    assert data["layer_types"] == even_sliding(3)
    assert data["cache_implementation"] == "hybrid"
    assert data["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"}
    assert data["label2id"] == {"LABEL_0": 0, "LABEL_1": 1}
    assert data == c.to_dict()


def test_written_text_spells_floats_as_floats():
    text = tiny_config(final_logit_softcapping=30, attn_logit_softcapping=50, rope_theta=10000).to_json_string()
    assert '"final_logit_softcapping": 30.0' in text
    assert '"attn_logit_softcapping": 50.0' in text
    assert '"rope_theta": 10000.0' in text
    assert '"vocab_size": 97,' in text


def test_cache_implementation_none_round_trips(tmp_path):
    ours = tiny_config(cache_implementation=None)
    ours.save_pretrained(tmp_path)
    assert load_hf(tmp_path).to_dict().get("cache_implementation") is None
    assert Gemma2Config.from_pretrained(tmp_path).cache_implementation is None


def test_to_dict_does_not_alias_config_state():
    c = tiny_config(layer_types=[FULL, SLIDING, FULL], eos_token_id=[1, 7])
    data = c.to_dict()
    data["layer_types"][0] = SLIDING
    data["label2id"]["LABEL_0"] = 99
    assert c.layer_types[0] == FULL
    assert c.label2id["LABEL_0"] == 0


def test_save_pretrained_creates_directories_and_overwrites(tmp_path):
    target = tmp_path / "a" / "b"
    tiny_config().save_pretrained(target)
    tiny_config(sliding_window=9).save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert Gemma2Config.from_pretrained(target).sliding_window == 9


# ------------------------------------------------------------------------------------------------
# Unknown keys


EXTRA_KEYS = {
    "quantization_notes": "int8 weight-only",
    "custom_nested": {"a": [1, 2.5, None], "b": {"c": True}},
    "adapter_rank": 16,
    "initializer_seed": None,
}


def test_unknown_keys_are_kept_and_written_back(tmp_path):
    path = write_config(tmp_path, {**json.loads(GEMMA_2_2B_JSON), **EXTRA_KEYS})
    c = Gemma2Config.from_pretrained(path)
    assert c.extra == EXTRA_KEYS
    out = tmp_path / "out"
    c.save_pretrained(out)
    written = json.loads((out / "config.json").read_text())
    for key, value in EXTRA_KEYS.items():
        assert written[key] == value, key
    assert Gemma2Config.from_pretrained(out).extra == EXTRA_KEYS
    hf = load_hf(out)
    assert hf.custom_nested == EXTRA_KEYS["custom_nested"]
    assert hf.adapter_rank == 16
    assert_matches_hf(c, hf)


def test_extra_survives_replace():
    c = Gemma2Config.from_dict({"model_type": "gemma2", **EXTRA_KEYS}).replace(num_hidden_layers=2)
    assert c.extra == EXTRA_KEYS
    assert c.to_dict()["adapter_rank"] == 16


def test_extra_never_overrides_a_field():
    c = tiny_config(extra={"vocab_size": 5, "hidden_size": "x", "note": 1})
    data = c.to_dict()
    assert data["vocab_size"] == 97
    assert data["hidden_size"] == 32
    assert data["note"] == 1


def test_translated_and_descriptive_keys_are_not_extra():
    data = {
        **json.loads(GEMMA_2_27B_IT_JSON),
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "rope_scaling": None,
        "dtype": "bfloat16",
        "num_labels": 2,
    }
    c = Gemma2Config.from_dict(data)
    assert c.extra == {}
    # The writer's version and source path are not echoed back as if they described our file.
    written = c.to_dict()
    assert "transformers_version" not in written
    assert "_name_or_path" not in written
