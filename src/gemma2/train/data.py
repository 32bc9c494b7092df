"""Training data: documents packed into fixed-length rows for causal-LM training.

Every document starts with <bos>. Rows are filled with whole documents back to back (a document
longer than a row continues in the next one); position ids restart at 0 at each document start, so
the model keeps attention inside each document (see gemma2.model.packed_segments), and the label of
each document's first token is -100, so no document is asked to predict the next one's <bos>.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from gemma2.heads import IGNORE_INDEX


@dataclass
class PackedRows:
    input_ids: torch.Tensor  # [N, L]
    position_ids: torch.Tensor  # [N, L]
    labels: torch.Tensor  # [N, L]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "position_ids": self.position_ids[index],
            "labels": self.labels[index],
        }

    def tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def pack_documents(
    documents: Iterable[list[int]], seq_len: int, bos_token_id: int, pad_token_id: int = 0
) -> PackedRows:
    """Pack tokenised documents (without <bos>; it is added here) into rows of seq_len tokens."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    ids: list[int] = []
    positions: list[int] = []
    labels: list[int] = []
    for document in documents:
        if not document:
            continue
        tokens = [bos_token_id, *document]
        for offset in range(0, len(tokens), seq_len):
            # A document cut at a row boundary restarts its positions in the next row: within a
            # row, positions must count from a <bos>-like start for the packed-attention rule.
            piece = tokens[offset : offset + seq_len]
            room = seq_len - len(ids) % seq_len
            if len(piece) > room and len(ids) % seq_len:
                # Do not split a piece across rows: fill the rest of this row with padding.
                ids.extend([pad_token_id] * room)
                positions.extend(range(room))
                labels.extend([IGNORE_INDEX] * room)
            ids.extend(piece)
            positions.extend(range(len(piece)))
            labels.extend([IGNORE_INDEX, *piece[1:]])
    if not ids:
        raise ValueError("no tokens to pack: every document is empty")
    tail = -len(ids) % seq_len
    ids.extend([pad_token_id] * tail)
    positions.extend(range(tail))
    labels.extend([IGNORE_INDEX] * tail)
    shape = (-1, seq_len)
    return PackedRows(
        torch.tensor(ids).view(shape), torch.tensor(positions).view(shape), torch.tensor(labels).view(shape)
    )
