"""What each rank of the tensor-parallel tests runs; the single-process side runs the same functions.

Every function builds its model from (config fields, seed), so that each rank and the reference
process hold the same weights before sharding, and returns plain tensors and lists.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from gemma2 import Gemma2Config, Gemma2ForCausalLM
from gemma2.engine import Engine
from gemma2.sampling import SamplingParams

# A tiny shape for the training tests (float32).
FIELDS_FOR_TRAINING: dict[str, Any] = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    query_pre_attn_scalar=16,
    sliding_window=4,
    max_position_embeddings=32,
)


def build(fields: dict[str, Any], seed: int, dtype: torch.dtype = torch.float32) -> Gemma2ForCausalLM:
    model = Gemma2ForCausalLM(Gemma2Config(**fields))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model.to(dtype).eval()


def prompts(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of two prompts longer than the tests' windows: ids [2, 12] and the mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (2, 12), generator=generator)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


def behaviour(model: Gemma2ForCausalLM) -> dict[str, Any]:
    """Everything the tests compare: full logits (padded batch), a cached decode through the ring
    buffer step by step, greedy and seeded generation, and the engine's greedy batch."""
    from gemma2.cache import Gemma2Cache

    vocab = model.config.vocab_size
    ids, mask = prompts(vocab)
    out: dict[str, Any] = {}
    with torch.no_grad():
        out["logits"] = model(ids, attention_mask=mask).logits
        cache = Gemma2Cache(model.config)
        steps = [model(ids[:1], past_key_values=cache).logits[:, -1]]
        token = steps[0].argmax(-1, keepdim=True)
        for _ in range(6):  # the prompt already fills the window: each step wraps the ring
            steps.append(model(token, past_key_values=cache).logits[:, -1])
            token = steps[-1].argmax(-1, keepdim=True)
        out["decode_logits"] = torch.stack(steps)
    out["greedy"] = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[]).tolist()
    out["sampled"] = model.generate(
        ids[:1], max_new_tokens=8, do_sample=True, temperature=1.5, top_k=20, seed=7, eos_token_id=[]
    ).tolist()
    engine = Engine(model, max_batch=3)
    rids = [engine.add(p, SamplingParams(max_new_tokens=6, ignore_eos=True)) for p in ([5, 6, 7], [9] * 11, [3, 4])]
    tokens: dict[Any, list[int]] = {rid: [] for rid in rids}
    while engine.has_unfinished():
        for event in engine.step():
            if event.token_id is not None:
                tokens[event.request_id].append(event.token_id)
    out["engine"] = [tokens[rid] for rid in rids]
    return out


def sharded_behaviour(payload: dict[str, Any]) -> dict[str, Any]:
    """On each rank: the model sharded over the world, its behaviour, and what sharding left."""
    from gemma2.distributed import shard_model

    model = shard_model(build(payload["fields"], payload["seed"]))
    out = behaviour(model)
    out["tied"] = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    out["local_vocab"] = model.model.embed_tokens.weight.shape[0]
    out["local_kv_rows"] = model.model.layers[0].self_attn.k_proj.weight.shape[0]
    stats = model.tensor_parallel.collectives.stats
    out["calls"] = dict(stats.calls)
    # Greedy decode steps: what the argmax across shards sends, against the logits a gather would.
    engine = Engine(model, max_batch=2)
    for prompt in ([5, 6, 7], [8, 9]):
        engine.add(prompt, SamplingParams(max_new_tokens=5, ignore_eos=True))
    engine.step()  # the prompts, whose first tokens come from gathered logits
    stats.reset()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    out["decode_gather_bytes_per_step"] = stats.payload_bytes["all_gather"] / steps
    return out


def argmax_ties(payload: dict[str, Any]) -> list[int]:
    """Collectives.argmax over each rank's shard of a global [rows, V] tensor."""
    from gemma2.distributed.collectives import Collectives

    collectives = Collectives()
    full: torch.Tensor = payload["logits"]
    share = full.shape[-1] // dist.get_world_size()
    start = dist.get_rank() * share
    return collectives.argmax(full[:, start : start + share], start).tolist()


def load_sharded(payload: dict[str, Any]) -> dict[str, Any]:
    """from_pretrained(..., tp_plan="auto") on each rank: its logits, bytes read and layer 0's weights."""
    model = Gemma2ForCausalLM.from_pretrained(
        payload["path"], tp_plan="auto", dtype=torch.float32, quantize=payload["quantize"], group_size=payload["group"]
    )
    return loaded_view(model, payload["ids"])


def loaded_view(model: Gemma2ForCausalLM, ids: torch.Tensor) -> dict[str, Any]:
    layer = model.model.layers[0]
    with torch.no_grad():
        logits = model(ids).logits
    parts = {"q": layer.self_attn.q_proj, "o": layer.self_attn.o_proj, "down": layer.mlp.down_proj}
    return {
        "logits": logits,
        "bytes_read": model.loading_info.bytes_read,
        "weights": {name: module.weight.clone() for name, module in parts.items()},
        "scales": {
            name: module.weight_scale.clone() for name, module in parts.items() if hasattr(module, "weight_scale")
        },
    }
