"""The three task heads on the Gemma 2 backbone, with the reference's outputs and losses.

- Gemma2ForCausalLM: tied LM head, final soft-cap tanh(x / 30) * 30 on every logit (before loss
  and sampling), shifted float32 cross-entropy ignoring -100.
- Gemma2ForSequenceClassification: a bias-free score layer on every position, pooled at each row's
  rightmost token that is not pad_token_id (right for left and right padding alike).
- Gemma2ForTokenClassification: dropout, then a biased score layer on every position.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from gemma2.attention import soft_cap
from gemma2.cache import Gemma2Cache
from gemma2.config import Gemma2Config
from gemma2.errors import InputError
from gemma2.model import Gemma2Model
from gemma2.outputs import CausalLMOutput, SequenceClassifierOutput, TokenClassifierOutput
from gemma2.pretrained import Gemma2PreTrainedModel

IGNORE_INDEX = -100


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row of logits [..., V] (the first of equal ones)."""
    return logits.argmax(dim=-1)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t's target is labels[t + 1]; the last position has none (-100)."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean float32 cross-entropy of position t predicting labels[t + 1], ignoring -100."""
    shifted = shifted_targets(labels)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX
    )


def _chunk_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float | None
) -> torch.Tensor:
    logits = soft_cap((hidden @ weight.T).float(), cap)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    final_logit_softcapping: float | None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """causal_lm_loss from hidden states [B, T, d], never holding float32 logits for every position.

    Gemma's vocabulary has 256000 entries: float32 logits cost 1 GiB per 1000 tokens, and autograd
    would keep them for the backward pass. The hidden states are projected a chunk of positions at
    a time, soft-capped as in the forward pass, and turned into a summed cross-entropy; each chunk
    is recomputed in the backward pass (activation checkpointing), so only one chunk's logits ever
    exist. The result equals the plain loss (mean over non-ignored labels).
    """
    targets = shifted_targets(labels).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    keep = targets != IGNORE_INDEX
    count = keep.sum()
    if int(count) == 0:
        return flat.sum() * 0.0  # no target: a zero that still belongs to the graph
    flat, targets = flat[keep], targets[keep]  # ignored positions need no logits at all
    total = flat.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], chunk_size):
        part, goal = flat[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and (part.requires_grad or lm_head_weight.requires_grad):
            total = total + torch.utils.checkpoint.checkpoint(
                _chunk_loss_sum, part, lm_head_weight, goal, final_logit_softcapping, use_reentrant=False
            )
        else:
            total = total + _chunk_loss_sum(part, lm_head_weight, goal, final_logit_softcapping)
    return total / count


class VocabParallel(Protocol):
    def gather(self, logits: torch.Tensor) -> torch.Tensor: ...

    def greedy_tokens(self, logits: torch.Tensor) -> torch.Tensor: ...


class Gemma2ForCausalLM(Gemma2PreTrainedModel):
    def __init__(self, config: Gemma2Config) -> None:
        super().__init__(config)
        self.model = Gemma2Model(config)
        self.lm_head: Any = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # The final soft-cap, tanh(x / cap) * cap; a backend may install its kernel (same results).
        self.logits_soft_cap: Callable[[torch.Tensor, float | None], torch.Tensor] = soft_cap
        # Greedy decoding's argmax over the vocabulary; a backend may install its kernel (same index).
        self.greedy_tokens: Callable[[torch.Tensor], torch.Tensor] = greedy_tokens
        # Under tensor parallelism (gemma2.distributed) the head gives this process a shard of the
        # vocabulary's logits, and this joins them (gather) or takes the argmax across them.
        self.vocab_parallel: VocabParallel | None = None
        if config.tie_word_embeddings:
            self.tie_weights()
        else:
            self._init_module(self.lm_head)

    def tie_weights(self) -> None:
        if not self.config.tie_word_embeddings:
            return
        embedding: Any = self.model.embed_tokens
        if hasattr(embedding, "as_linear"):  # a quantized embedding (gemma2.quant) makes its own head
            self.lm_head = embedding.as_linear()
        else:
            self.lm_head.weight = embedding.weight

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Gemma2Cache | None = None,
        use_cache: bool | None = False,
        labels: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool = False,
        cache: Gemma2Cache | None = None,
        cache_rows: torch.Tensor | list[int] | None = None,
        vocab_shard: bool = False,
    ) -> CausalLMOutput:
        """Logits [B, T, V] (or the last `logits_to_keep` positions), soft-capped; loss if labels.

        With a cache, row b continues cache row cache_rows[b] (default b), each at its own length.
        `vocab_shard` returns only the logits this process holds (its shard of the vocabulary under
        tensor parallelism, all of them otherwise), for `greedy_tokens_of_shard`.
        """
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values if past_key_values is not None else cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            cache_rows=cache_rows,
        )
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            if logits_to_keep < 0:
                raise InputError(f"logits_to_keep must be >= 0, got {logits_to_keep}")
            if logits_to_keep > 0:
                h = h[:, -logits_to_keep:]
        else:
            h = h[:, logits_to_keep]
        # The soft-cap is elementwise: capping each shard of the vocabulary caps the whole, bit for bit.
        logits = self.logits_soft_cap(self.lm_head(h), self.config.final_logit_softcapping)
        if self.vocab_parallel is not None and not vocab_shard:
            logits = self.vocab_parallel.gather(logits)
        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:-1]:
                raise InputError(
                    f"labels must have shape {list(logits.shape[:-1])} (one per position), got {list(labels.shape)}"
                )
            loss = causal_lm_loss(logits, labels)
        return CausalLMOutput(
            loss=loss, logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states
        )

    def chunked_loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mean next-token loss of `labels`, from hidden states a chunk of positions at a time (never
        all the logits): what training calls. One method, so that a sharded model (FSDP) gathers the
        embedding and the tied head for the whole of it."""
        hidden = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask)
        return chunked_causal_lm_loss(
            hidden.last_hidden_state, self.lm_head.weight, labels, self.config.final_logit_softcapping
        )

    def greedy_tokens_of_shard(self, logits: torch.Tensor) -> torch.Tensor:
        """The greedy tokens from logits that forward(..., vocab_shard=True) returned."""
        if self.vocab_parallel is None:
            return self.greedy_tokens(logits)
        return self.vocab_parallel.greedy_tokens(logits)

    def generation_config_dict(self) -> dict[str, Any] | None:
        return {
            "bos_token_id": self.config.bos_token_id,
            "eos_token_id": self.config.eos_token_id,
            "pad_token_id": self.config.pad_token_id,
            **self.generation_config,
        }

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Prompt plus new tokens, LongTensor [B, T + new]; rows that stopped are padded with pad_token_id.

        Greedy unless do_sample. Stop tokens default to generation_config.json's eos_token_id,
        else the config's. A seed makes sampling reproducible.
        """
        from gemma2.generation import generate

        return generate(
            self,
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            seed=seed,
        )


class Gemma2ForSequenceClassification(Gemma2PreTrainedModel):
    head_keys = ("score.weight",)

    def __init__(self, config: Gemma2Config) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        assert config.num_labels is not None
        self.model = Gemma2Model(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self._init_module(self.score)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Gemma2Cache | None = None,
        use_cache: bool | None = False,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> SequenceClassifierOutput:
        """Logits [B, num_labels] at each row's last non-pad token; loss by problem_type."""
        batch = (
            input_ids.shape[0]
            if input_ids is not None
            else (inputs_embeds.shape[0] if inputs_embeds is not None else 0)
        )
        pad_id = self.config.pad_token_id
        if pad_id is None and batch > 1:
            raise InputError(
                "Cannot handle batch sizes > 1 if no padding token is defined (config.pad_token_id is None)"
            )
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        logits = self.score(out.last_hidden_state)  # [B, T, num_labels]
        if pad_id is not None and input_ids is not None:
            # Rightmost non-pad token; a row of only padding pools position 0, as the reference does.
            positions = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
            last = (positions * (input_ids != pad_id).to(logits.device, torch.int32)).argmax(-1)
        else:
            # With inputs_embeds padding cannot be seen: the last position is used.
            last = torch.full((logits.shape[0],), logits.shape[1] - 1, device=logits.device, dtype=torch.long)
        pooled = logits[torch.arange(logits.shape[0], device=logits.device), last]
        loss = self.classification_loss(pooled, labels) if labels is not None else None
        return SequenceClassifierOutput(
            loss=loss, logits=pooled, past_key_values=out.past_key_values, hidden_states=out.hidden_states
        )

    def classification_loss(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """MSE (regression), cross-entropy (single label) or BCE with logits (multi label).

        An unset problem_type is decided as the reference decides it: one label means regression,
        integer labels single-label, anything else multi-label. Unlike the reference, the decision is
        not written into the config (a forward pass never changes it): each call decides afresh.
        """
        num_labels = self.config.num_labels
        assert num_labels is not None
        problem = self.config.problem_type
        if problem is None:
            if num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        labels = labels.to(pooled.device)
        if problem == "regression":
            target = labels.to(pooled.dtype)
            if num_labels == 1:
                return F.mse_loss(pooled.squeeze(), target.squeeze())
            return F.mse_loss(pooled, target)
        if problem == "single_label_classification":
            if labels.dtype.is_floating_point:
                raise InputError(f"single_label_classification needs integer class labels, got dtype {labels.dtype}")
            return F.cross_entropy(pooled.view(-1, num_labels), labels.view(-1), ignore_index=IGNORE_INDEX)
        if labels.shape != pooled.shape:
            raise InputError(
                f"multi_label_classification needs labels of shape {list(pooled.shape)} (one 0/1 per label), "
                f"got {list(labels.shape)}"
            )
        return F.binary_cross_entropy_with_logits(pooled, labels.to(pooled.dtype))


class Gemma2ForTokenClassification(Gemma2PreTrainedModel):
    head_keys = ("score.weight", "score.bias")

    def __init__(self, config: Gemma2Config) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        assert config.num_labels is not None
        self.model = Gemma2Model(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else 0.1
        self.dropout = nn.Dropout(p)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=True)
        self._init_module(self.score)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> TokenClassifierOutput:
        """Logits [B, T, num_labels]; cross-entropy loss ignoring -100 if labels [B, T] are given."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
        )
        logits = self.score(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:-1]:
                raise InputError(f"labels must have shape {list(logits.shape[:-1])}, got {list(labels.shape)}")
            loss = F.cross_entropy(
                logits.float().view(-1, logits.shape[-1]), labels.view(-1).to(logits.device), ignore_index=IGNORE_INDEX
            )
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
