"""Training pieces: the chunked loss, document packing, the schedule and the loop itself."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal

import pytest
import torch
from conftest import randomize_, tiny_config

from gemma2 import Gemma2ForCausalLM
from gemma2.heads import chunked_causal_lm_loss
from gemma2.train.data import IGNORE_INDEX, pack_documents
from gemma2.train.trainer import TrainSettings, causal_lm_loss, learning_rate, train_causal_lm


@pytest.mark.parametrize("chunk", [1, 5, 16, 4096])
@pytest.mark.parametrize("cap", [30.0, 3.0, None])
def test_chunked_loss_and_gradients_equal_the_plain_loss(chunk: int, cap: float | None) -> None:
    config = tiny_config(final_logit_softcapping=cap)
    model = randomize_(Gemma2ForCausalLM(config), std=0.2)
    ids = torch.randint(1, config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(chunk))
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX
    labels[2, 7] = IGNORE_INDEX
    plain = model(ids, labels=labels).loss
    plain.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hidden = model.model(ids).last_hidden_state
    chunked = chunked_causal_lm_loss(hidden, model.lm_head.weight, labels, cap, chunk_size=chunk)
    chunked.backward()
    assert abs(chunked.item() - plain.item()) <= 1e-5
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[name], atol=1e-5), name


def test_chunked_loss_without_targets_is_zero_and_differentiable() -> None:
    model = Gemma2ForCausalLM(tiny_config())
    hidden = model.model(torch.tensor([[1, 2, 3]])).last_hidden_state
    loss = chunked_causal_lm_loss(hidden, model.lm_head.weight, torch.full((1, 3), IGNORE_INDEX), 30.0)
    loss.backward()
    assert loss.item() == 0.0


def test_packing_starts_every_document_with_bos_and_masks_boundaries() -> None:
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16]]
    rows = pack_documents(docs, seq_len=6, bos_token_id=2, pad_token_id=0)
    x = IGNORE_INDEX
    # A document that does not fit the rest of a row starts the next one (the rest is padding);
    # one longer than a row continues in the next row, its positions restarting there.
    assert rows.input_ids.tolist() == [
        [2, 5, 6, 7, 0, 0],
        [2, 8, 9, 0, 0, 0],
        [2, 10, 11, 12, 13, 14],
        [15, 16, 0, 0, 0, 0],
    ]
    assert rows.position_ids.tolist() == [
        [0, 1, 2, 3, 0, 1],
        [0, 1, 2, 0, 1, 2],
        [0, 1, 2, 3, 4, 5],
        [0, 1, 0, 1, 2, 3],
    ]
    assert rows.labels.tolist() == [
        [x, 5, 6, 7, x, x],
        [x, 8, 9, x, x, x],
        [x, 10, 11, 12, 13, 14],
        [x, 16, x, x, x, x],
    ]
    assert rows.tokens() == 11
    with pytest.raises(ValueError, match="seq_len"):
        pack_documents(docs, seq_len=1, bos_token_id=2)
    with pytest.raises(ValueError, match="empty"):
        pack_documents([[], []], seq_len=4, bos_token_id=2)


def test_packed_documents_do_not_see_each_other() -> None:
    """The loss of a packed row is the token-weighted loss of its documents run alone."""
    config = tiny_config(sliding_window=3)
    model = randomize_(Gemma2ForCausalLM(config), std=0.2).eval()
    docs = [[5, 6, 7, 8], [9, 10, 11, 12, 13], [14, 15]]
    rows = pack_documents(docs, seq_len=16, bos_token_id=2)
    assert len(rows) == 1
    with torch.no_grad():
        packed = causal_lm_loss(model, rows.batch(torch.arange(1))).item()
        total, count = 0.0, 0
        for doc in docs:
            ids = torch.tensor([[2, *doc]])
            total += model(ids, labels=ids).loss.item() * len(doc)
            count += len(doc)
    assert abs(packed - total / count) <= 1e-5


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    settings = TrainSettings(max_steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    rates = [learning_rate(step, settings) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))
    assert learning_rate(100, settings) == pytest.approx(1e-4)


def test_training_overfits_a_tiny_batch() -> None:
    torch.manual_seed(0)
    config = tiny_config(vocab_size=64, sliding_window=4)
    model = Gemma2ForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 64, (12,), generator=g).tolist() for _ in range(4)]
    rows = pack_documents(docs, seq_len=13, bos_token_id=2)
    before = math.exp(causal_lm_loss(model.eval(), rows.batch(torch.arange(len(rows)))).item())
    settings = TrainSettings(max_steps=300, batch_size=4, lr=1e-2, warmup_steps=10, weight_decay=0.0, progress=False)
    result = train_causal_lm(model, rows, settings, eval_rows=rows)
    assert before > 30
    # After <bos> nothing tells the 4 documents apart: their first tokens cost ln(4) each, an
    # irreducible ln(4) / 12 per token on average; everything else is memorised.
    floor = math.log(4) / 12
    assert floor <= result["eval_loss"] < floor + 0.05
    assert result["steps"] == 300


def test_bf16_autocast_training_runs_and_learns() -> None:
    torch.manual_seed(0)
    config = tiny_config(vocab_size=64)
    model = Gemma2ForCausalLM(config)
    docs = [list(range(3, 15))] * 4
    rows = pack_documents(docs, seq_len=13, bos_token_id=2)
    settings = TrainSettings(max_steps=60, batch_size=4, lr=3e-3, warmup_steps=5, bf16=True, progress=False)
    result = train_causal_lm(model, rows, settings, eval_rows=rows)
    assert result["eval_loss"] < 1.0


def test_gemma2_train_fine_tunes_and_writes_a_loadable_directory(tmp_path, capsys) -> None:
    from gemma2 import Gemma2Tokenizer, stream
    from gemma2.cli import main
    from gemma2.io.default_model import BUNDLED

    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Line {i}: the quick brown fox."}) for i in range(40)) + "\n")
    held = tmp_path / "held.txt"
    held.write_text("Line 99: the quick brown fox.")
    out = tmp_path / "out"
    code = main(
        [
            "train",
            "--model",
            str(BUNDLED),
            "--data",
            str(data),
            "--eval-data",
            str(held),
            "--out",
            str(out),
            "--max-steps",
            "4",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--lr",
            "1e-3",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "trained 4 steps" in printed and "perplexity" in printed
    model = Gemma2ForCausalLM.from_pretrained(out)
    text = "".join(stream(model, Gemma2Tokenizer.from_pretrained(out), "Line 5:", max_new_tokens=5))
    assert isinstance(text, str) and text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{"text": 5}\n', "data.jsonl:2"),
        ('{"text": "ok"}\nnot json\n', "data.jsonl:2: not valid JSON"),
        ("\n\n", "no records"),
    ],
)
def test_bad_data_files_name_the_file_and_line(tmp_path, capsys, content: str, message: str) -> None:
    from gemma2.cli import main
    from gemma2.io.default_model import BUNDLED

    data = tmp_path / "data.jsonl"
    data.write_text(content)
    code = main(["train", "--model", str(BUNDLED), "--data", str(data), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("gemma2: error:") and message in err
    assert not (tmp_path / "out").exists()


def test_gemma2_train_with_lora_writes_an_adapter_or_merged_weights(tmp_path, capsys) -> None:
    from gemma2.cli import main
    from gemma2.io.default_model import BUNDLED

    data = tmp_path / "data.txt"
    data.write_text("A different text to adapt to. " * 30)
    common = ["train", "--model", str(BUNDLED), "--data", str(data), "--max-steps", "2", "--seq-len", "32"]
    assert main([*common, "--out", str(tmp_path / "adapter"), "--lora-rank", "2", "--batch-size", "2"]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["peft_type"] == "LORA"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    assert main([*common, "--out", str(tmp_path / "merged"), "--lora-rank", "2", "--merge", "--batch-size", "2"]) == 0
    merged = Gemma2ForCausalLM.from_pretrained(tmp_path / "merged")
    base = Gemma2ForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32)
    assert merged.num_parameters() == base.num_parameters()
    assert "LoRA adapter" in capsys.readouterr().out


def _synthetic_sentiment(path, count: int, seed: int) -> None:
    import random

    rng = random.Random(seed)
    good, bad = ["great", "excellent", "lovely", "superb"], ["awful", "terrible", "broken", "dreadful"]
    filler = ["the", "module", "returns", "a", "list", "of", "values", "when", "called"]
    lines = []
    for _ in range(count):
        label = rng.choice(["positive", "negative"])
        words = [*rng.sample(filler, 5), rng.choice(good if label == "positive" else bad)]
        rng.shuffle(words)
        lines.append(json.dumps({"text": " ".join(words), "label": label}))
    path.write_text("\n".join(lines) + "\n")


def test_sequence_classification_learns_well_above_chance(tmp_path, capsys) -> None:
    from gemma2 import Gemma2ForSequenceClassification
    from gemma2.cli import main
    from gemma2.io.default_model import BUNDLED

    _synthetic_sentiment(tmp_path / "train.jsonl", 200, seed=0)
    _synthetic_sentiment(tmp_path / "eval.jsonl", 60, seed=1)
    args = [
        "train",
        "--model",
        str(BUNDLED),
        "--task",
        "sequence-classification",
        "--data",
        str(tmp_path / "train.jsonl"),
    ]
    args += ["--eval-data", str(tmp_path / "eval.jsonl"), "--out", str(tmp_path / "out"), "--max-steps", "40"]
    assert main([*args, "--batch-size", "16", "--lr", "1e-3", "--seq-len", "32"]) == 0
    printed = capsys.readouterr().out
    accuracy = float(printed.split("eval accuracy ")[1].split(",")[0])
    assert accuracy >= 0.9, printed
    model = Gemma2ForSequenceClassification.from_pretrained(tmp_path / "out")
    assert model.config.id2label == {0: "negative", 1: "positive"}


def test_token_classification_trains_from_tokens_and_tags(tmp_path, capsys) -> None:
    import random

    from gemma2 import Gemma2ForTokenClassification
    from gemma2.cli import main
    from gemma2.io.default_model import BUNDLED

    rng = random.Random(0)
    words = ["open", "file", "path", "list", "read", "value", "data", "name"]

    def write(path, count):
        lines = []
        for _ in range(count):
            tokens = [rng.choice(words) if rng.random() < 0.6 else str(rng.randint(0, 999)) for _ in range(6)]
            tags = ["NUM" if t.isdigit() else "WORD" for t in tokens]
            lines.append(json.dumps({"tokens": tokens, "tags": tags}))
        path.write_text("\n".join(lines) + "\n")

    write(tmp_path / "train.jsonl", 120)
    write(tmp_path / "eval.jsonl", 30)
    args = ["train", "--model", str(BUNDLED), "--task", "token-classification", "--data", str(tmp_path / "train.jsonl")]
    args += ["--eval-data", str(tmp_path / "eval.jsonl"), "--out", str(tmp_path / "out"), "--max-steps", "30"]
    assert main([*args, "--batch-size", "16", "--lr", "1e-3", "--seq-len", "32"]) == 0
    printed = capsys.readouterr().out
    assert float(printed.split("eval accuracy ")[1].split(",")[0]) >= 0.9, printed
    model = Gemma2ForTokenClassification.from_pretrained(tmp_path / "out")
    assert set(model.config.id2label.values()) == {"NUM", "WORD"}


def test_classification_data_errors_name_the_line(tmp_path, capsys) -> None:
    from gemma2.cli import main
    from gemma2.io.default_model import BUNDLED

    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "fine", "label": "a"}\n{"text": "no label"}\n')
    code = main(
        [
            "train",
            "--model",
            str(BUNDLED),
            "--task",
            "sequence-classification",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "data.jsonl:2" in capsys.readouterr().err
    tags = tmp_path / "tags.jsonl"
    tags.write_text('{"tokens": ["a", "b"], "tags": ["X"]}\n')
    code = main(
        [
            "train",
            "--model",
            str(BUNDLED),
            "--task",
            "token-classification",
            "--data",
            str(tags),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "tags.jsonl:1" in capsys.readouterr().err


def test_chat_targets_are_the_model_turns_only() -> None:
    from gemma2 import Gemma2Tokenizer
    from gemma2.io.default_model import BUNDLED
    from gemma2.train.chat import encode_conversations

    tok = Gemma2Tokenizer.from_pretrained(BUNDLED)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye!"},
    ]
    data = encode_conversations(tok, [messages], max_len=512)
    ids, labels = data.input_ids[0], data.labels[0]
    assert ids == tok.apply_chat_template(messages)
    targets = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tok.decode(targets) == "Hello there.<end_of_turn>\nGoodbye!<end_of_turn>\n"


def test_gemma2_train_chat_lowers_the_loss_on_model_turns(tmp_path, capsys) -> None:
    from gemma2.cli import main
    from gemma2.io.default_model import BUNDLED

    data = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]}
        for i in range(20)
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    base = ["train", "--model", str(BUNDLED), "--task", "chat", "--data", str(data), "--eval-data", str(data)]
    assert main([*base, "--out", str(tmp_path / "a"), "--max-steps", "1", "--lr", "1e-9", "--batch-size", "4"]) == 0
    before = float(capsys.readouterr().out.split("eval loss ")[1].split(" ")[0])
    assert main([*base, "--out", str(tmp_path / "b"), "--max-steps", "30", "--lr", "2e-3", "--batch-size", "4"]) == 0
    after = float(capsys.readouterr().out.split("eval loss ")[1].split(" ")[0])
    assert after < before - 1.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "only a question"}]}\n')
    assert (
        main(["train", "--model", str(BUNDLED), "--task", "chat", "--data", str(bad), "--out", str(tmp_path / "c")])
        == 2
    )
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_resume_after_ctrl_c_equals_an_uninterrupted_run(tmp_path) -> None:
    from gemma2.train.trainer import TrainingInterrupted, train

    def fresh() -> Gemma2ForCausalLM:
        torch.manual_seed(0)
        return Gemma2ForCausalLM(tiny_config(vocab_size=64, num_labels=3))

    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(3, 64, (int(n),), generator=g).tolist() for n in torch.randint(5, 30, (12,), generator=g)]
    rows = pack_documents(docs, seq_len=16, bos_token_id=2)
    settings = TrainSettings(max_steps=9, batch_size=3, grad_accum=2, lr=3e-3, warmup_steps=2, progress=False)

    reference = fresh()
    train(reference, rows, settings, causal_lm_loss)

    def ctrl_c_at(step: int):
        def hook(done: int) -> None:
            if done == step:
                raise KeyboardInterrupt

        return hook

    interrupted = fresh()
    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(interrupted, rows, settings, causal_lm_loss, checkpoint=tmp_path / "state", on_step=ctrl_c_at(4))
    resumed = fresh()  # a new process: a fresh model, everything else comes from the saved state
    result = train(resumed, rows, settings, causal_lm_loss, checkpoint=tmp_path / "state", resume=True)
    assert result["steps"] == 9
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_without_saved_state_is_a_clear_error(tmp_path) -> None:
    from gemma2.train.trainer import TrainingError, train

    rows = pack_documents([[5, 6, 7]], seq_len=4, bos_token_id=2)
    model = Gemma2ForCausalLM(tiny_config())
    with pytest.raises(TrainingError, match="no saved training state"):
        train(model, rows, TrainSettings(max_steps=1, progress=False), causal_lm_loss, checkpoint=tmp_path, resume=True)


def test_gemma2_train_resume_from_the_command_line(tmp_path, capsys, monkeypatch) -> None:
    from gemma2.cli import main
    from gemma2.io.default_model import BUNDLED

    data = tmp_path / "data.txt"
    data.write_text("Resume me, exactly as if nothing had happened. " * 40)
    args = ["train", "--model", str(BUNDLED), "--data", str(data), "--max-steps", "4", "--seq-len", "32"]
    args += ["--batch-size", "2", "--lr", "1e-3"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0

    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def interrupt_third(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # Ctrl-C in the middle of the third step
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupt_third)
    assert main([*args, "--out", str(tmp_path / "resumed")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (tmp_path / "resumed.resume" / "training_state.pt").exists()
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    assert main([*args, "--out", str(tmp_path / "resumed"), "--resume"]) == 0
    assert not (tmp_path / "resumed.resume").exists()
    a = Gemma2ForCausalLM.from_pretrained(tmp_path / "straight").state_dict()
    b = Gemma2ForCausalLM.from_pretrained(tmp_path / "resumed").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
