"""Chat data: conversations in the model's chat template, with the loss on the model's turns only.

JSONL, one {"messages": [{"role": ..., "content": ...}, ...]} per line. Each conversation is one row
(cut to the sequence length). The targets are the tokens of every assistant turn, its
<end_of_turn> included: what the model must learn to write, and to stop writing; the user turns
and the template's markup are context only (-100).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gemma2.heads import IGNORE_INDEX
from gemma2.tokenizer import ChatFormatError
from gemma2.train.classification import PaddedExamples
from gemma2.train.datasets import DataError, read_records


def read_conversations(path: str | Path) -> list[list[dict[str, Any]]]:
    path = Path(path)
    conversations = []
    for number, record in read_records(path):
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DataError(f'{path}:{number}: expected an object with a non-empty "messages" list')
        if not any(isinstance(m, dict) and m.get("role") in ("assistant", "model") for m in messages):
            raise DataError(f"{path}:{number}: the conversation has no assistant turn to learn from")
        conversations.append(messages)
    return conversations


def encode_conversations(
    tokenizer: Any, conversations: list[list[dict[str, Any]]], max_len: int, source: str = "data"
) -> PaddedExamples:
    rows, row_labels = [], []
    for index, messages in enumerate(conversations):
        try:
            ids = tokenizer.apply_chat_template(messages)
            labels = [IGNORE_INDEX] * len(ids)
            for turn, message in enumerate(messages):
                if message.get("role") not in ("assistant", "model"):
                    continue
                start = len(tokenizer.apply_chat_template(messages[:turn], add_generation_prompt=True))
                stop = len(tokenizer.apply_chat_template(messages[: turn + 1]))
                labels[start:stop] = ids[start:stop]
        except ChatFormatError as error:
            raise DataError(f"{source}: conversation {index + 1}: {error}") from None
        rows.append(ids[:max_len])
        row_labels.append(labels[:max_len])
    return PaddedExamples(rows, row_labels, tokenizer.pad_token_id)


def chat_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.chunked_loss(batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"])
