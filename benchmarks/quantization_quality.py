"""Quality of int8 / int4 weight-only quantization on the bundled demo model, against bf16.

    python benchmarks/quantization_quality.py [--rows 64] [--decode-rows 4]

Held-out text: the documents the demo model's recipe held out of training (gemma2.recipes.demo),
packed into 256-token rows as in training. For bf16 and each quantized variant it reports

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
from gemma2.default_model import BUNDLED
from gemma2.recipes.demo import SEQ_LEN, is_held_out, stdlib_documents
from gemma2.train.data import pack_documents

VARIANTS = [("bf16", None, None), ("int8", "int8", None)] + [(f"int4 g{g}", "int4", g) for g in (64, 128, 256)]


def held_out_rows(tokenizer: Gemma2Tokenizer, rows: int) -> torch.Tensor:
    documents = [d for d in stdlib_documents() if is_held_out(d)]
    packed = pack_documents(tokenizer.backend.encode_batch(documents), SEQ_LEN, tokenizer.bos_token_id)
    batch = packed.batch(torch.arange(min(rows, len(packed))))
    return batch["input_ids"]


def prompt_logits(model: Gemma2ForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(row[None]).logits.float() for row in ids])


def decode_logits(model: Gemma2ForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Logits of every position, computed one token at a time through the cache."""
    out = []
    with torch.no_grad():
        for row in ids:
            cache = Gemma2Cache(model.config, max_length=row.numel())
            steps = [model(row[None, t : t + 1], past_key_values=cache).logits.float() for t in range(row.numel())]
            out.append(torch.cat(steps, dim=1))
    return torch.cat(out)


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return math.exp(float(loss))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64, help="held-out rows of 256 tokens (prompt path)")
    parser.add_argument("--decode-rows", type=int, default=4, help="rows also run token by token (decode path)")
    args = parser.parse_args()

    tokenizer = Gemma2Tokenizer.from_pretrained(BUNDLED)
    ids = held_out_rows(tokenizer, args.rows)
    decode_ids = ids[: args.decode_rows]
    print(f"demo model {BUNDLED}; {ids.numel():,} held-out tokens, {decode_ids.numel():,} of them also decoded")
    print(
        f"\n{'weights':<10} {'MiB':>6} {'ppl':>8} {'ppl/bf16':>9} {'top-1 =bf16':>12} {'decode ppl':>11} {'top-1':>7}"
    )
    reference: dict[str, torch.Tensor] = {}
    base_ppl = 0.0
    for name, mode, group in VARIANTS:
        model = Gemma2ForCausalLM.from_pretrained(BUNDLED, dtype=torch.bfloat16, quantize=mode, group_size=group)
        size = sum(t.numel() * t.element_size() for t in model.checkpoint_state_dict().values()) / 2**20
        prompt, decode = prompt_logits(model, ids), decode_logits(model, decode_ids)
        if mode is None:
            reference, base_ppl = {"prompt": prompt.argmax(-1), "decode": decode.argmax(-1)}, perplexity(prompt, ids)
        ppl = perplexity(prompt, ids)
        agree = float((prompt.argmax(-1) == reference["prompt"]).float().mean())
        decode_agree = float((decode.argmax(-1) == reference["decode"]).float().mean())
        print(
            f"{name:<10} {size:>6.1f} {ppl:>8.3f} {ppl / base_ppl:>9.4f} {agree:>12.4f} "
            f"{perplexity(decode, decode_ids):>11.3f} {decode_agree:>7.4f}"
        )


if __name__ == "__main__":
    main()
