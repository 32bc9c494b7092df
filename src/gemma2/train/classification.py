"""Classification data: reading, label maps, padded batches, the loss and accuracy / macro-F1.

Sequence classification: JSONL {"text": ..., "label": ...} or CSV with `text,label` columns; string or
integer labels, mapped to ids in sorted order (id2label goes into the saved config).
Token classification: JSONL {"tokens": [...], "tags": [...]}; each word is encoded on its own (words
after the first with their leading space) and its tag sits on its first sub-token, -100 elsewhere.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gemma2.heads import IGNORE_INDEX
from gemma2.train.datasets import DataError, read_records, read_text


def _read_lines(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Records of a JSONL file, or the rows of a CSV file with `text,label` columns."""
    if path.suffix != ".csv":
        return read_records(path)
    reader = csv.DictReader(read_text(path).splitlines())
    if reader.fieldnames is None or not {"text", "label"} <= set(reader.fieldnames):
        raise DataError(f"{path}:1: a CSV needs a header with 'text' and 'label' columns")
    rows = [(number, dict(row)) for number, row in enumerate(reader, start=2)]
    if not rows:
        raise DataError(f"{path}: no records")
    return rows


def read_sequence_examples(path: str | Path) -> tuple[list[str], list[str]]:
    path = Path(path)
    texts, labels = [], []
    for number, record in _read_lines(path):
        text, label = record.get("text"), record.get("label")
        if not isinstance(text, str) or label is None or isinstance(label, (list, dict)):
            raise DataError(f"{path}:{number}: expected a 'text' string and a 'label', got {record!r}"[:300])
        texts.append(text)
        labels.append(str(label))
    return texts, labels


def read_token_examples(path: str | Path) -> tuple[list[list[str]], list[list[str]]]:
    path = Path(path)
    words, tags = [], []
    for number, record in _read_lines(path):
        tokens, labels = record.get("tokens"), record.get("tags")
        if not isinstance(tokens, list) or not isinstance(labels, list) or len(tokens) != len(labels) or not tokens:
            raise DataError(f"{path}:{number}: expected equally long, non-empty 'tokens' and 'tags' lists")
        words.append([str(t) for t in tokens])
        tags.append([str(t) for t in labels])
    return words, tags


def label_map(labels: list[str], known: dict[int, str] | None = None) -> dict[str, int]:
    """label -> id: a model's existing id2label when it covers the labels, else sorted order
    (numerically when every label is an integer)."""
    values = sorted(set(labels), key=lambda v: (0, int(v), "") if v.lstrip("-").isdigit() else (1, 0, v))
    if known and set(values) <= set(known.values()):
        return {name: i for i, name in known.items()}
    return {value: i for i, value in enumerate(values)}


@dataclass
class PaddedExamples:
    """Tokenised examples with a label per example ([N]) or per token (lists)."""

    input_ids: list[list[int]]
    labels: list[Any]
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = [self.input_ids[int(i)] for i in index]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for row, tokens in enumerate(rows):  # right padding: pooling takes the last real token
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        first = self.labels[int(index[0])]
        if isinstance(first, list):
            labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
            for row, i in enumerate(index):
                tags = self.labels[int(i)]
                labels[row, : len(tags)] = torch.tensor(tags)
        else:
            labels = torch.tensor([self.labels[int(i)] for i in index], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encode_sequence_examples(tokenizer: Any, texts: list[str], labels: list[int], max_len: int) -> PaddedExamples:
    encoded = [tokenizer.encode(text)[:max_len] for text in texts]
    return PaddedExamples(encoded, labels, tokenizer.pad_token_id)


def encode_token_examples(
    tokenizer: Any, words: list[list[str]], tags: list[list[int]], max_len: int
) -> PaddedExamples:
    rows, row_labels = [], []
    for sentence, sentence_tags in zip(words, tags):
        ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
        for position, (word, tag) in enumerate(zip(sentence, sentence_tags)):
            pieces = tokenizer.encode(word if position == 0 else " " + word, add_special_tokens=False)
            ids.extend(pieces)
            labels.extend([tag] + [IGNORE_INDEX] * (len(pieces) - 1))
        rows.append(ids[:max_len])
        row_labels.append(labels[:max_len])
    return PaddedExamples(rows, row_labels, tokenizer.pad_token_id)


def labelled_tokens(batch: dict[str, torch.Tensor]) -> int:
    """A token classifier's targets: the tokens with a label (not -100)."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


def classification_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return out.loss


@torch.no_grad()
def classification_metrics(model: Any, data: PaddedExamples, batch_size: int) -> dict[str, float]:
    """Loss, accuracy and macro-F1 over all examples (over labelled tokens for token tasks)."""
    was_training = model.training
    model.eval()
    predictions, targets, losses = [], [], []
    for start in range(0, len(data), batch_size):
        batch = data.batch(torch.arange(start, min(start + batch_size, len(data))))
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        losses.append(float(out.loss))
        keep = batch["labels"] != IGNORE_INDEX
        predictions.append(out.logits.argmax(-1)[keep])
        targets.append(batch["labels"][keep])
    model.train(was_training)
    predicted, target = torch.cat(predictions), torch.cat(targets)
    f1s = []
    for label in target.unique():
        tp = int(((predicted == label) & (target == label)).sum())
        fp = int(((predicted == label) & (target != label)).sum())
        fn = int(((predicted != label) & (target == label)).sum())
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {
        "eval_loss": sum(losses) / len(losses),
        "accuracy": float((predicted == target).float().mean()),
        "macro_f1": sum(f1s) / len(f1s),
    }
