"""SFT data: assistant-only targets ending with EOS in the tokenizer's chat format, masked prompts never
contribute, packing with segments equals scoring each conversation alone, truncation counts, exact data
position, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from instruct_helpers import char_tokenizer, one_thread

from smoe.model.attention import SelfAttention
from smoe.train.losses import IGNORE, LMObjective
from smoe.train.sft import (
    PackedChats,
    SFTDataError,
    collate_rows,
    encode_conversation,
    pack,
    read_chats,
    tokenize_chats,
)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return char_tokenizer(tmp_path_factory.mktemp("chartok"))


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "max of 3 8 1"},
        {"role": "assistant", "content": "8"}, {"role": "user", "content": "and min?"},
        {"role": "assistant", "content": "1"}]


def spans(mask: list[bool]) -> list[tuple[int, int]]:
    out, start = [], None
    for i, m in enumerate(mask + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def test_only_assistant_tokens_are_targets_each_turn_ending_with_eos(tok):
    ids, mask = encode_conversation(tok, CHAT)
    assert ids == tok.encode_chat(CHAT)  # the chat format, unchanged
    turns = spans(mask)
    assert [tok.decode(ids[a:b]) for a, b in turns] == [" 8", " 1"]
    assert all(ids[b - 1] == tok.eos_id for _, b in turns)
    assert sum(mask) == len(tok.encode(" 8", bos=False)) + len(tok.encode(" 1", bos=False)) + 2
    prompt = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "Be brief." in prompt and "max of 3 8 1" in prompt and "[/INST]" in prompt


def test_mask_with_the_mixtral_tokenizer_and_a_system_prompt():
    from smoe.tokenizer import load_tokenizer
    mt = load_tokenizer("mixtral")  # mistral-common's own renderer (it moves the system prompt)
    chat = [*CHAT[:4], {"role": "assistant", "content": "It is 1."}]
    ids, mask = encode_conversation(mt, chat)
    assert ids == mt.encode_chat(chat)
    turns = spans(mask)
    assert [mt.decode(ids[a:b]).strip() for a, b in turns] == ["8", "It is 1."]
    assert all(ids[b - 1] == mt.eos_id for _, b in turns)


def test_targets_are_the_next_assistant_token(tok):
    examples, _ = tokenize_chats(tok, [CHAT, CHAT[1:3]], seq_len=256)
    ids, mask = encode_conversation(tok, CHAT)
    want = [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    assert examples[0][0].tolist() == ids and examples[0][1].tolist() == want


def _logits_grad(model, batch):
    """Run the SFT objective and return the gradient of the loss with respect to the logits."""
    captured = {}

    def hook(_, __, out):
        out.retain_grad()
        captured["logits"] = out
    h = model.output.register_forward_hook(hook)
    loss, _ = LMObjective(aux_coef=0.0, z_coef=0.0)(model, batch)
    h.remove()
    loss.backward()
    return loss, captured["logits"].grad


def test_a_masked_prompt_token_never_contributes(tok):
    model = tiny_model(0, vocab_size=128).train()
    examples, _ = tokenize_chats(tok, [CHAT, CHAT[1:3]], seq_len=128)
    batch = collate_rows(examples, pack([len(e[0]) for e in examples], 128, [0, 1]), 128)
    loss, g = _logits_grad(model, batch)
    scored = batch["targets"] != IGNORE
    assert g[~scored].abs().max() == 0  # no gradient from any prompt, marker or padding position
    assert (g[scored].abs().sum(-1) > 0).all()
    # whatever the model predicts at masked positions, the loss is the same
    noise = torch.randn(g.shape) * 10 * (~scored)[..., None]
    h = model.output.register_forward_hook(lambda _, __, out: out + noise)
    with torch.no_grad():
        loss2, _ = LMObjective(aux_coef=0.0, z_coef=0.0)(model, batch)
    h.remove()
    assert float(loss2) == float(loss.detach())


def test_packing_with_segments_equals_each_conversation_alone(tok):
    """Packed conversations do not see each other: the packed loss sum equals the sum of lone losses."""
    model = tiny_model(0, vocab_size=128)
    chats = [CHAT, CHAT[1:3], [{"role": "user", "content": "reverse a b c"}, {"role": "assistant", "content": "c b a"}],
             CHAT[1:], [{"role": "user", "content": "add 2 and 3"}, {"role": "assistant", "content": "5"}]]
    examples, stats = tokenize_chats(tok, chats, seq_len=96)
    rows = pack([len(e[0]) for e in examples], 96, list(range(len(examples))))
    assert sorted(i for r in rows for i in r) == list(range(len(examples)))
    assert all(sum(len(examples[i][0]) for i in r) <= 96 for r in rows) and len(rows) < len(examples)
    batch = collate_rows(examples, rows, 96)

    def nll_sum(tokens, targets, attn=None):
        with torch.no_grad():
            logits = model(tokens, attn=attn)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), targets.flatten(),
                                                 ignore_index=IGNORE, reduction="sum")
    pos = torch.arange(96).expand(len(rows), 96)
    packed = nll_sum(batch["tokens"], batch["targets"], SelfAttention(pos, valid=batch["valid"],
                                                                      segments=batch["segments"]))
    alone = sum(nll_sum(torch.from_numpy(ids)[None], torch.from_numpy(tg)[None]) for ids, tg in examples)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-4)
    assert stats.target_tokens == int((batch["targets"] != IGNORE).sum())
    # and without the segment mask they would differ (the test can tell)
    leaky = nll_sum(batch["tokens"], batch["targets"], SelfAttention(pos, valid=batch["valid"]))
    assert abs(float(leaky - alone)) > 1e-3


def test_long_conversations_are_truncated_or_skipped_and_counted(tok):
    long_chat = [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "y" * 40}]
    all_prompt = [{"role": "user", "content": "x" * 80}, {"role": "assistant", "content": "y"}]
    no_reply = [{"role": "user", "content": "hi"}]
    chats = [CHAT[1:3], long_chat, all_prompt, no_reply]
    ex, stats = tokenize_chats(tok, chats, seq_len=64)
    assert (stats.conversations, stats.used, stats.truncated, stats.skipped_too_long,
            stats.skipped_no_assistant) == (4, 2, 1, 1, 1)
    assert max(len(e[0]) for e in ex) == 64
    ex, stats = tokenize_chats(tok, chats, seq_len=64, truncation="skip")
    assert (stats.used, stats.truncated, stats.skipped_too_long) == (1, 0, 2)
    assert "2/4 conversations used (1 truncated" in tokenize_chats(tok, chats, seq_len=64)[1].line()


def test_packed_chats_resume_at_the_same_batch(tok):
    chats = [[{"role": "user", "content": f"max of {i} {i + 1}"}, {"role": "assistant", "content": str(i + 1)}]
             for i in range(30)]
    ex, _ = tokenize_chats(tok, chats, seq_len=64)
    a = PackedChats(ex, batch_size=3, seq_len=64, seed=5)
    for _ in range(4):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))
    want = [next(a) for _ in range(6)]  # crosses an epoch boundary
    assert a.epoch >= 1
    b = PackedChats(ex, batch_size=3, seq_len=64, seed=5)
    b.load_state_dict(state)
    for w, got in zip(want, [next(b) for _ in range(6)]):
        assert all(torch.equal(w[k], got[k]) for k in w)
    with pytest.raises(SFTDataError, match="different data or seq_len"):
        PackedChats(ex[:-1], batch_size=3, seq_len=64).load_state_dict(state)


@pytest.mark.parametrize("line, message", [
    ("{not json", r":2: not valid JSON"),
    ('{"text": "hi"}', r":2: expected \{\"messages\""),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', r":2: chat: message 0 is an assistant message"),
    ('{"messages": [{"role": "user", "content": 3}]}', r":2: chat: message 0 content must be a string"),
])
def test_bad_chat_data_names_the_line(tmp_path, line, message):
    f = tmp_path / "chats.jsonl"
    f.write_text(json.dumps({"messages": CHAT}) + "\n" + line + "\n")
    with pytest.raises(SFTDataError, match=message):
        read_chats(f)
    with pytest.raises(SFTDataError, match="does not exist"):
        read_chats(tmp_path / "missing.jsonl")


def test_sft_run_resumes_exactly(tmp_path):
    """`smoe sft` killed after its step-2 checkpoint and resumed ends where an uninterrupted run does."""
    from instruct_helpers import assert_resumes_exactly, base_model

    from smoe.train.sft import SFTConfig, run_sft
    from smoe.train.tasks import chat, make_tasks
    model = base_model(tmp_path / "base", dim=32, hidden_dim=64)
    train, _ = make_tasks(60, 0, seed=1)
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(chat(p, a)) + "\n" for p, a, _ in train))
    assert_resumes_exactly(tmp_path, lambda t, resume: run_sft(
        SFTConfig(model=str(model), data=str(data), val_fraction=0.1, seq_len=64, train=t), resume=resume))


def test_finetune_settings_from_the_command_line():
    from smoe.train.sft import SFT_TRAIN, finetune_config
    t = finetune_config(SFT_TRAIN, ["warmup_steps=5", "autocast=bf16"], out_dir="x", lr=None, batch_size=4)
    assert (t.max_steps, t.warmup_steps, t.autocast, t.lr, t.batch_size, t.out_dir) == (0, 5, "bf16", 1e-4, 4, "x")
    assert finetune_config(SFT_TRAIN, ["max_steps=7"]).max_steps == 7  # then the epochs do not count
    assert finetune_config(SFT_TRAIN, max_steps=9).max_steps == 9
    with pytest.raises(ValueError, match="keeps the checkpoint's model"):
        finetune_config(SFT_TRAIN, ["model.dim=3"])
    with pytest.raises(ValueError, match="unknown override"):
        finetune_config(SFT_TRAIN, ["nonsense=1"])


def test_smoe_sft_by_epochs_from_the_command_line(tmp_path, capsys):
    from instruct_helpers import base_model

    from smoe.cli import main
    from smoe.train.tasks import chat, make_tasks
    model = base_model(tmp_path / "base", dim=32, hidden_dim=64)
    train, _ = make_tasks(40, 0, seed=2)
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(chat(p, a)) + "\n" for p, a, _ in train))
    assert main(["sft", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--seq-len", "64", "--batch-size", "4", "tensorboard=false", "plots=false", "progress=false"]) == 0
    out = capsys.readouterr().out
    assert "38/38 conversations used" in out and "held-out data: 2/2" in out
    state = json.loads((tmp_path / "run" / "checkpoints").glob("step_*/trainer_state.json").__next__().read_text())
    rows = state["run_info"]["rows_per_epoch"]
    assert state["step"] == -(-rows // 4)  # one epoch of packed rows, 4 rows a step
    assert (tmp_path / "run" / "final" / "tokenizer.json").exists()
    assert main(["sft", "--model", str(tmp_path / "nowhere"), "--data", str(data)]) == 2
    assert "smoe sft: error:" in capsys.readouterr().err
