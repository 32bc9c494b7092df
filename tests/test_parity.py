"""Numerical parity with transformers' Gemma2 (eager attention): logits, hidden states, heads, losses."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import hf_model, tiny_config

from gemma2 import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma2ForSequenceClassification,
    Gemma2ForTokenClassification,
    Gemma2Model,
)

FP32_TOL = 1e-4

# Shapes covering every attention layout and configuration rule the reference has.
SHAPES: dict[str, dict[str, Any]] = {
    "gqa": {},
    "multi_query": dict(num_attention_heads=4, num_key_value_heads=1),
    "multi_head": dict(num_attention_heads=2, num_key_value_heads=2, head_dim=16, hidden_size=32),
    "hd_bigger_than_d": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16, hidden_size=32),
    "scalar_27b_style": dict(head_dim=8, query_pre_attn_scalar=144),
    "odd_layers_window_2": dict(num_hidden_layers=5, sliding_window=2),
    "window_1": dict(sliding_window=1),
    "explicit_layer_types": dict(
        num_hidden_layers=4, layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    ),
    "all_full": dict(num_hidden_layers=2, layer_types=["full_attention"] * 2),
    "no_softcaps": dict(final_logit_softcapping=None, attn_logit_softcapping=None),
    "no_attn_softcap": dict(attn_logit_softcapping=None),
    "small_softcaps": dict(final_logit_softcapping=3.0, attn_logit_softcapping=2.0),
    "exact_gelu": dict(hidden_activation="gelu"),
    "untied_head": dict(tie_word_embeddings=False),
    "rope_theta": dict(rope_theta=500.0, rms_norm_eps=1e-5),
}


def ours_from(hf: Any, cls: type, config: Gemma2Config, dtype: torch.dtype = torch.float32) -> Any:
    """Our model with the oracle's weights, loaded strictly (so the state-dict keys must match)."""
    model = cls(config)
    model.load_state_dict(hf.state_dict(), strict=True)
    return model.to(dtype).eval()


def batch(config: Gemma2Config, B: int = 3, T: int = 13, seed: int = 1, padding: str = "none") -> tuple[Any, Any]:
    """Random ids avoiding pad (0); rows padded on the left or right by different amounts."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.vocab_size, (B, T), generator=g)
    if padding == "none":
        return ids, None
    mask = torch.ones(B, T, dtype=torch.long)
    for row in range(1, B):
        pad = min(T - 1, 2 * row + 1)
        if padding == "left":
            mask[row, :pad] = 0
        else:
            mask[row, T - pad :] = 0
    ids = ids.masked_fill(mask == 0, config.pad_token_id or 0)
    return ids, mask


def real_positions(mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """Which positions hold real tokens (padding rows' outputs are not meaningful)."""
    return torch.ones(shape, dtype=torch.bool) if mask is None else mask.bool()


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_causal_lm_logits_and_hidden_states_match_fp32(shape: str, padding: str) -> None:
    config = tiny_config(**SHAPES[shape])
    hf = hf_model(config, "causal", seed=hash(shape) % 1000)
    ours = ours_from(hf, Gemma2ForCausalLM, config)
    ids, mask = batch(config, T=17, padding=padding)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, output_hidden_states=True)
        got = ours(ids, attention_mask=mask, output_hidden_states=True)
    real = real_positions(mask, ids.shape)
    assert (got.logits - expected.logits)[real].abs().max() <= FP32_TOL
    assert len(got.hidden_states) == config.num_hidden_layers + 1 == len(expected.hidden_states)
    for mine, theirs in zip(got.hidden_states, expected.hidden_states):
        assert (mine - theirs)[real].abs().max() <= FP32_TOL
    # The final soft-cap bounds every logit.
    if config.final_logit_softcapping is not None:
        assert got.logits.abs().max() <= config.final_logit_softcapping


def test_padding_rows_match_reference_too() -> None:
    """Fully masked (pad) query rows stay finite and equal the reference's (finite mask minimum)."""
    config = tiny_config()
    hf = hf_model(config, "causal")
    ours = ours_from(hf, Gemma2ForCausalLM, config)
    ids, mask = batch(config, T=11, padding="left")
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max() <= FP32_TOL


@pytest.mark.parametrize("shape", ["gqa", "multi_query", "scalar_27b_style", "odd_layers_window_2"])
def test_causal_lm_matches_in_bfloat16(shape: str) -> None:
    config = tiny_config(**SHAPES[shape])
    hf = hf_model(config, "causal", std=0.1).to(torch.bfloat16)
    ours = ours_from(hf, Gemma2ForCausalLM, config, torch.bfloat16)
    ids, mask = batch(config, T=15, padding="left")
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits.float()
        got = ours(ids, attention_mask=mask).logits.float()
    real = mask.bool()
    diff = (got - expected)[real].abs()
    assert diff.max() <= 0.05 * expected[real].abs().max()
    assert (got.argmax(-1) == expected.argmax(-1))[real].float().mean() >= 0.9


def test_bfloat16_embedding_scale_is_rounded_like_the_reference() -> None:
    """sqrt(d) is rounded to bf16 before multiplying: sqrt(56) = 7.483 becomes 7.46875 (sqrt(3584) -> 59.75)."""
    config = tiny_config(hidden_size=56, num_attention_heads=4)
    hf = hf_model(config, "base").to(torch.bfloat16)
    ours = ours_from(hf, Gemma2Model, config, torch.bfloat16)
    ids = torch.tensor([[1, 2, 3, 50]])
    with torch.no_grad():
        expected = hf(ids, output_hidden_states=True).hidden_states[0]
        got = ours(ids, output_hidden_states=True).hidden_states[0]
    assert torch.equal(got, expected)
    assert torch.equal(got, ours.embed_tokens.weight[ids] * 7.46875)


@pytest.mark.parametrize("keep", [1, 3])
def test_logits_to_keep_matches_reference(keep: int) -> None:
    config = tiny_config()
    hf = hf_model(config, "causal")
    ours = ours_from(hf, Gemma2ForCausalLM, config)
    ids, _ = batch(config, T=9)
    with torch.no_grad():
        expected = hf(ids, logits_to_keep=keep).logits
        got = ours(ids, logits_to_keep=keep).logits
    assert got.shape == (ids.shape[0], keep, config.vocab_size)
    assert (got - expected).abs().max() <= FP32_TOL


def test_causal_lm_loss_matches_reference_with_ignored_labels() -> None:
    config = tiny_config()
    hf = hf_model(config, "causal")
    ours = ours_from(hf, Gemma2ForCausalLM, config)
    ids, mask = batch(config, T=12, padding="left")
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, labels=labels).loss
        got = ours(ids, attention_mask=mask, labels=labels).loss
    assert got is not None and got.dtype == torch.float32
    assert abs(got.item() - expected.item()) <= 1e-5
    # The loss is the soft-capped one: computing it from uncapped logits would differ.
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask).logits
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, config.vocab_size), shifted.reshape(-1))
    assert abs(got.item() - manual.item()) <= 1e-6


def test_inputs_embeds_match_reference() -> None:
    config = tiny_config()
    hf = hf_model(config, "causal")
    ours = ours_from(hf, Gemma2ForCausalLM, config)
    embeds = torch.randn(2, 7, config.hidden_size)
    with torch.no_grad():
        expected = hf(inputs_embeds=embeds).logits
        got = ours(inputs_embeds=embeds).logits
    assert (got - expected).abs().max() <= FP32_TOL


def test_explicit_position_ids_and_packed_documents_match_reference() -> None:
    config = tiny_config()
    hf = hf_model(config, "causal")
    ours = ours_from(hf, Gemma2ForCausalLM, config)
    ids, _ = batch(config, B=2, T=12)
    # Two documents packed in one row (positions restart): without a cache, attention stays in
    # each document. (The reference only applies this rule when no cache is in use.)
    packed = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5], list(range(3, 15))])
    with torch.no_grad():
        expected = hf(ids, position_ids=packed, use_cache=False).logits
        got = ours(ids, position_ids=packed).logits
        alone = ours(ids[:1, 6:], position_ids=packed[:1, 6:] * 1).logits
    assert (got - expected).abs().max() <= FP32_TOL
    assert (got[0, 6:] - alone[0]).abs().max() <= FP32_TOL


def test_base_model_matches_reference() -> None:
    config = tiny_config(num_hidden_layers=2)
    hf = hf_model(config, "base")
    ours = ours_from(hf, Gemma2Model, config)
    ids, mask = batch(config, T=10, padding="right")
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, output_hidden_states=True)
        got = ours(ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    assert (got.last_hidden_state - expected.last_hidden_state)[real].abs().max() <= FP32_TOL
    assert torch.equal(got.hidden_states[-1], got.last_hidden_state)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("num_labels", [1, 3])
def test_sequence_classification_pooling_and_losses(padding: str, num_labels: int) -> None:
    config = tiny_config(num_labels=num_labels)
    hf = hf_model(config, "sequence")
    ours = ours_from(hf, Gemma2ForSequenceClassification, config)
    ids, mask = batch(config, B=4, T=9, padding=padding)
    if num_labels == 1:
        label_sets = {"regression": torch.randn(4)}
    else:
        label_sets = {
            "single_label_classification": torch.tensor([0, 2, 1, 2]),
            "multi_label_classification": torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 1], [0, 1, 0]]),
        }
    for problem, labels in label_sets.items():
        hf.config.problem_type = None
        ours.config.problem_type = None
        with torch.no_grad():
            expected = hf(ids, attention_mask=mask, labels=labels)
            got = ours(ids, attention_mask=mask, labels=labels)
        assert got.logits.shape == (4, num_labels)
        assert (got.logits - expected.logits).abs().max() <= FP32_TOL
        assert hf.config.problem_type == problem  # the reference stores its decision in the config...
        assert ours.config.problem_type is None  # ...a forward pass here never writes into it
        assert abs(got.loss.item() - expected.loss.item()) <= 1e-5


def test_sequence_classification_pools_the_rightmost_real_token() -> None:
    """Left padding must pool the last token, not the first real one (a known pooling bug)."""
    config = tiny_config(num_labels=2)
    model = Gemma2ForSequenceClassification(config).eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
        left = model(ids[:1, 2:]).logits
        right = model(ids[1:, :3]).logits
    assert (out[0] - left[0]).abs().max() <= 1e-5
    assert (out[1] - right[0]).abs().max() <= 1e-5


def test_sequence_classification_without_pad_id_rejects_batches() -> None:
    config = tiny_config(pad_token_id=None)
    model = Gemma2ForSequenceClassification(config).eval()
    with pytest.raises(ValueError, match="padding token"):
        model(torch.tensor([[1, 2], [3, 4]]))
    single = model(torch.tensor([[1, 2, 3]])).logits
    assert single.shape == (1, 2)


def test_token_classification_matches_reference_with_loss() -> None:
    config = tiny_config(num_labels=5)
    hf = hf_model(config, "token")
    ours = ours_from(hf, Gemma2ForTokenClassification, config)
    ids, mask = batch(config, T=8, padding="left")
    labels = torch.randint(0, 5, ids.shape).masked_fill(mask == 0, -100)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, labels=labels)
        got = ours(ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    assert (got.logits - expected.logits)[real].abs().max() <= FP32_TOL
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-5
    assert ours.score.bias is not None and ours.dropout.p == 0.1


def test_token_classification_dropout_is_active_only_in_training() -> None:
    config = tiny_config(num_labels=3)
    model = Gemma2ForTokenClassification(config)
    ids = torch.randint(1, config.vocab_size, (2, 6))
    model.train()
    torch.manual_seed(0)
    a = model(ids).logits
    b = model(ids).logits
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_gradients_match_reference() -> None:
    config = tiny_config()
    hf = hf_model(config, "causal", std=0.1)
    ours = ours_from(hf, Gemma2ForCausalLM, config)
    ids, _ = batch(config, B=2, T=10)
    hf(ids, labels=ids).loss.backward()
    ours(ids, labels=ids).loss.backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None
        assert (p.grad - theirs[name].grad).abs().max() <= 1e-4, name
