"""The public API's conveniences that users know from transformers."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_, tiny_config

from gemma2 import (
    CausalLMOutput,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma2ForSequenceClassification,
    Gemma2ForTokenClassification,
    Gemma2Model,
    InputError,
)


def test_constructor_accepts_transformers_4_and_5_spellings() -> None:
    five = Gemma2Config(
        num_hidden_layers=2,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        dtype="bfloat16",
        attn_implementation="eager",
    )
    four = Gemma2Config(
        num_hidden_layers=2, rope_theta=500.0, torch_dtype="torch.bfloat16", hidden_act="gelu_pytorch_tanh"
    )
    assert five.rope_theta == four.rope_theta == 500.0
    assert five.dtype == four.dtype == "bfloat16"
    assert five.to_dict() == four.to_dict()
    assert "attn_implementation" not in five.to_dict()
    legacy = Gemma2Config(num_hidden_layers=2, sliding_window=None, sliding_window_size=64)
    assert legacy.sliding_window == 64


def test_outputs_index_like_model_output() -> None:
    model = randomize_(Gemma2ForCausalLM(tiny_config())).eval()
    ids = torch.randint(1, 97, (1, 6))
    out = model(ids)
    assert isinstance(out, CausalLMOutput)
    assert out[0] is out.logits and out["logits"] is out.logits
    assert out.keys() == ["logits"]
    with_loss = model(ids, labels=ids)
    assert with_loss[0] is with_loss.loss and with_loss[1] is with_loss.logits
    with pytest.raises(KeyError):
        out["loss"]
    assert model(ids, use_cache=True).cache is not None


@pytest.mark.parametrize("cls", [Gemma2Model, Gemma2ForCausalLM, Gemma2ForSequenceClassification])
def test_embedding_accessors(cls: type) -> None:
    model = cls(tiny_config())
    embedding = model.get_input_embeddings()
    assert embedding.weight.shape == (97, 32)
    if cls is Gemma2ForCausalLM:
        assert model.get_output_embeddings().weight is embedding.weight
        replacement = torch.nn.Embedding(97, 32, padding_idx=0)
        model.set_input_embeddings(replacement)
        assert model.lm_head.weight is replacement.weight
    else:
        assert model.get_output_embeddings() is None


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    config = tiny_config()
    plain = randomize_(Gemma2ForCausalLM(config), std=0.1)
    checkpointed = randomize_(Gemma2ForCausalLM(config), std=0.1)
    checkpointed.gradient_checkpointing_enable()
    ids = torch.randint(1, 97, (2, 9))
    plain.train()
    checkpointed.train()
    plain(ids, labels=ids).loss.backward()
    checkpointed(ids, labels=ids).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_num_parameters_counts_the_tied_head_once() -> None:
    config = tiny_config()
    model = Gemma2ForCausalLM(config)
    d, F, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    H, K, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    per_layer = d * H * D * 2 + d * K * D * 2 + 3 * d * F + 4 * d
    assert model.num_parameters() == V * d + L * per_layer + d


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(input_ids=torch.tensor([[1, 97]])), "token id 97"),
        (dict(input_ids=torch.tensor([[-1, 3]])), "token id -1"),
        (dict(input_ids=torch.tensor([1, 2, 3])), "input_ids must have shape"),
        (dict(input_ids=torch.tensor([[1.0, 2.0]])), "integer token ids"),
        (dict(), "exactly one of input_ids or inputs_embeds"),
        (dict(inputs_embeds=torch.zeros(1, 3, 31)), "inputs_embeds must have shape"),
        (dict(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3)), "attention_mask must have shape"),
        (
            dict(input_ids=torch.tensor([[1, 2]]), position_ids=torch.tensor([[0, 1, 2]])),
            "position_ids must have shape",
        ),
        (dict(input_ids=torch.tensor([[1, 2]]), labels=torch.tensor([[1, 2, 3]])), "labels must have shape"),
        (dict(input_ids=torch.tensor([[1, 2]]), logits_to_keep=-1), "logits_to_keep"),
    ],
)
def test_bad_forward_arguments_raise_clear_errors(kwargs: dict, message: str) -> None:
    model = Gemma2ForCausalLM(tiny_config()).eval()
    with pytest.raises(InputError, match=message):
        model(**kwargs)


def test_token_classification_rejects_mis_shaped_labels() -> None:
    model = Gemma2ForTokenClassification(tiny_config(num_labels=3)).eval()
    with pytest.raises(InputError, match="labels must have shape"):
        model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2]]))
