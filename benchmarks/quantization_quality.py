"""Quality of int8 / int4 weight-only quantization on the bundled demo model, against bf16.

    python benchmarks/quantization_quality.py [--rows 64] [--decode-rows 4]

Held-out text: the documents the demo model's recipe held out of training (gemma2.recipes.demo),
one per row with its <bos>, cut to the 256-token training length. For bf16 and each quantized variant it reports

- perplexity on the held-out rows (a full forward pass per row: the prompt path, where quantized
  weights are expanded to bf16 and multiplied by the bf16 matmul);
- top-1 agreement: the share of positions whose most likely next token equals bf16's;
- the same two on the decode path (one token at a time through the KV cache, where the native
  kernels multiply integer weights by int16-quantized activations), on the first --decode-rows rows.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from gemma2 import Gemma2ForCausalLM, Gemma2Tokenizer
from gemma2.cache import Gemma2Cache
from gemma2.io.default_model import BUNDLED
from gemma2.recipes.demo import SEQ_LEN, is_held_out, stdlib_documents

VARIANTS = [("bf16", None, None), ("int8", "int8", None)] + [(f"int4 g{g}", "int4", g) for g in (64, 128, 256)]


def held_out_rows(tokenizer: Gemma2Tokenizer, rows: int) -> list[torch.Tensor]:
    """The held-out documents, one per row with its <bos>, cut to the training length."""
    documents = [d for d in stdlib_documents() if is_held_out(d)]
    encoded = [[tokenizer.bos_token_id, *ids][:SEQ_LEN] for ids in tokenizer.backend.encode_batch(documents)]
    return [torch.tensor(ids) for ids in encoded if len(ids) >= 32][:rows]


def prompt_logits(model: Gemma2ForCausalLM, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(row[None]).logits[0].float() for row in rows]


def decode_logits(model: Gemma2ForCausalLM, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits of every position, computed one token at a time through the cache."""
    out = []
    with torch.no_grad():
        for row in rows:
            cache = Gemma2Cache(model.config, max_length=row.numel())
            steps = [model(row[None, t : t + 1], past_key_values=cache).logits[0].float() for t in range(row.numel())]
            out.append(torch.cat(steps))
    return out


def perplexity(logits: list[torch.Tensor], rows: list[torch.Tensor]) -> float:
    losses = [F.cross_entropy(lg[:-1], row[1:], reduction="sum") for lg, row in zip(logits, rows, strict=True)]
    return math.exp(float(sum(losses)) / sum(row.numel() - 1 for row in rows))


def agreement(logits: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    same = sum(int((lg.argmax(-1) == ref).sum()) for lg, ref in zip(logits, reference, strict=True))
    return same / sum(ref.numel() for ref in reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400, help="held-out documents (prompt path)")
    parser.add_argument("--decode-rows", type=int, default=16, help="documents also run token by token (decode)")
    args = parser.parse_args()

    tokenizer = Gemma2Tokenizer.from_pretrained(BUNDLED)
    ids = held_out_rows(tokenizer, args.rows)
    decode_ids = ids[: args.decode_rows]
    counts = sum(row.numel() for row in ids), sum(row.numel() for row in decode_ids)
    print(f"demo model {BUNDLED}; {len(ids)} held-out documents, {counts[0]:,} tokens ({counts[1]:,} also decoded)")
    print(
        f"\n{'weights':<10} {'MiB':>6} {'ppl':>8} {'ppl/bf16':>9} {'top-1 =bf16':>12} {'decode ppl':>11} {'top-1':>7}"
    )
    reference: dict[str, list[torch.Tensor]] = {}
    base_ppl = 0.0
    for name, mode, group in VARIANTS:
        model = Gemma2ForCausalLM.from_pretrained(BUNDLED, dtype=torch.bfloat16, quantize=mode, group_size=group)
        size = sum(t.numel() * t.element_size() for t in model.checkpoint_state_dict().values()) / 2**20
        prompt, decode = prompt_logits(model, ids), decode_logits(model, decode_ids)
        if mode is None:
            reference = {"prompt": [lg.argmax(-1) for lg in prompt], "decode": [lg.argmax(-1) for lg in decode]}
            base_ppl = perplexity(prompt, ids)
        ppl = perplexity(prompt, ids)
        agree, decode_agree = agreement(prompt, reference["prompt"]), agreement(decode, reference["decode"])
        print(
            f"{name:<10} {size:>6.1f} {ppl:>8.3f} {ppl / base_ppl:>9.4f} {agree:>12.4f} "
            f"{perplexity(decode, decode_ids):>11.3f} {decode_agree:>7.4f}"
        )


if __name__ == "__main__":
    main()
