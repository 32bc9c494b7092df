"""LoRA adapters: merge equivalence, PEFT layout (loaded by peft on transformers), training."""

from __future__ import annotations

import json

import torch
from conftest import hf_model, randomize_, tiny_config

from gemma2 import Gemma2ForCausalLM
from gemma2.train.data import pack_documents
from gemma2.train.lora import DEFAULT_TARGETS, LoRALinear, apply_lora, lora_state_dict, merge_lora, save_adapter
from gemma2.train.trainer import TrainSettings, train_causal_lm


def adapted(seed: int = 0, rank: int = 4) -> tuple[object, Gemma2ForCausalLM]:
    config = tiny_config()
    hf = hf_model(config, "causal", seed=seed, std=0.1)
    ours = Gemma2ForCausalLM(config)
    ours.load_state_dict(hf.state_dict())
    wrapped = apply_lora(ours, rank=rank, alpha=8.0)
    assert len(wrapped) == config.num_hidden_layers * len(DEFAULT_TARGETS)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in ours.modules():
            if isinstance(module, LoRALinear):  # B starts at zero: give it values so the test bites
                module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=g) * 0.1)
    return hf, ours.eval()


def test_merged_and_unmerged_outputs_agree() -> None:
    _, model = adapted()
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        unmerged = model(ids).logits
        merged_model = merge_lora(model)
        merged = merged_model(ids).logits
    assert not any(isinstance(m, LoRALinear) for m in merged_model.modules())
    assert (merged - unmerged).abs().max() <= 1e-5


def test_adapter_files_use_peft_names_and_load_in_peft(tmp_path) -> None:
    from peft import PeftModel

    hf, ours = adapted(seed=3)
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    keys = set(lora_state_dict(ours))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.2.mlp.down_proj.lora_B.weight" in keys
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(1, 97, (2, 8))
    with torch.no_grad():
        expected = peft_model(ids).logits
        got = ours(ids).logits
    assert (got - expected).abs().max() <= 1e-5


def test_lora_training_changes_only_the_adapters() -> None:
    torch.manual_seed(0)
    config = tiny_config(vocab_size=64)
    model = randomize_(Gemma2ForCausalLM(config), std=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=4, alpha=8.0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    rows = pack_documents([list(range(3, 15))] * 4, seq_len=13, bos_token_id=2)
    settings = TrainSettings(max_steps=40, batch_size=4, lr=1e-2, warmup_steps=2, weight_decay=0.0, progress=False)
    start = train_causal_lm(model, rows, TrainSettings(max_steps=1, lr=0.0, progress=False), eval_rows=rows)
    result = train_causal_lm(model, rows, settings, eval_rows=rows)
    assert result["eval_loss"] < start["eval_loss"] - 1.0
    merge_lora(model)
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)
