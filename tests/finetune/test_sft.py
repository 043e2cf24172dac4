"""SFT data: assistant-only labels, the serving chat template, bad rows by file:line, packing isolation."""

import json
import logging

import pytest
import torch

import deepseek as ds
from deepseek.data.chat import render_chat
from deepseek.data.tokenizer import train_tokenizer
from deepseek.finetune.sft import (IGNORE_INDEX, encode_chat, encode_prompt_completion, pack, read_sft_jsonl,
                                   sft_targets)
from deepseek.serve.protocols.openai_api import chat_prompt

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"}, {"role": "user", "content": "def f(x):"},
        {"role": "assistant", "content": "    return x + 1"}]


@pytest.fixture(scope="module")
def chat_tok():
    return train_tokenizer(["def f(x):\n    return x + 1\n" * 20, "hello world, hello chat\n" * 20], vocab_size=300)


def labelled_text(tok, ids, labels):
    return [tok.decode([t], skip_special_tokens=False) for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]


def test_labels_cover_exactly_the_assistant_tokens_and_their_end(chat_tok):
    ids, labels = encode_chat(chat_tok, CHAT)
    assert len(ids) == len(labels)
    assert ids == chat_tok.encode(render_chat(chat_tok, [(m["role"], m["content"]) for m in CHAT],
                                              add_generation_prompt=False)).ids
    end = chat_tok.token_to_id("<|end|>")
    kept = [(t, lab) for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert all(t == lab for t, lab in kept)
    # Exactly: the two assistant contents, each followed by <|end|>.
    expected = (chat_tok.encode("hello world").ids + [end] + chat_tok.encode("    return x + 1").ids + [end])
    assert [t for t, _ in kept] == expected
    # Nothing of the system/user turns nor the <|assistant|> tokens is labelled.
    assistant = chat_tok.token_to_id("<|assistant|>")
    assert all(lab == IGNORE_INDEX for t, lab in zip(ids, labels) if t == assistant)


def test_prompt_completion_pair(chat_tok):
    ids, labels = encode_prompt_completion(chat_tok, "hello", "world")
    assert chat_tok.decode(ids, skip_special_tokens=False) == "<|user|>hello<|end|><|assistant|>world<|end|>"
    assert "".join(labelled_text(chat_tok, ids, labels)) == "world<|end|>"
    # The byte tokenizer's plain transcript: the label covers what serving would have the model write.
    byte = ds.byte_tokenizer()
    ids, labels = encode_prompt_completion(byte, "hi", "yo")
    assert byte.decode(ids) == "User: hi\nAssistant: yo\n"
    assert "".join(labelled_text(byte, ids, labels)) == " yo\n"


def test_the_sft_renderer_is_servings(chat_tok):
    replies = {"role tokens": "    return x + 1<|end|>", "plain": "     return x + 1\n"}
    for kind, tok in (("role tokens", chat_tok), ("plain", ds.byte_tokenizer())):
        text, _, _ = chat_prompt(tok, CHAT[:4])
        assert text == render_chat(tok, [(m["role"], m["content"]) for m in CHAT[:4]])
        # A training chat is serving's prompt for its history, then the labelled reply (what serving generates).
        ids, labels = encode_chat(tok, CHAT)
        full = tok.decode(ids, skip_special_tokens=False)
        assert full == text + replies[kind]
        assert "".join(labelled_text(tok, ids, labels)).endswith(replies[kind])
    parts = [{**m, "content": [{"type": "text", "text": m["content"][:2]}, {"type": "text", "text": m["content"][2:]}]}
             for m in CHAT]
    assert encode_chat(chat_tok, parts) == encode_chat(chat_tok, CHAT)
    assert chat_prompt(chat_tok, parts[:4])[0] == chat_prompt(chat_tok, CHAT[:4])[0]
    assert chat_prompt(chat_tok, CHAT[:2])[0] == "<|system|>be brief<|end|><|user|>hello<|end|><|assistant|>"


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


BAD_ROWS = [
    {"messages": CHAT},                                                      # 1 good
    {"messages": [{"content": "no role"}, {"role": "assistant", "content": "x"}]},  # 2 missing role
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},  # 3 empty assistant
    {"prompt": "hello", "completion": "world"},                             # 4 good
    {"prompt": "hello " * 200, "completion": "world"},                      # 5 over-long
    "{not json",                                                            # 6
    {"messages": [{"role": "user", "content": "only a question"}]},         # 7 no assistant turn
]


def test_bad_rows_are_reported_by_file_and_line(tmp_path, chat_tok, caplog):
    path = tmp_path / "sft.jsonl"
    write_rows(path, BAD_ROWS)
    problems = []
    with caplog.at_level(logging.WARNING, logger="deepseek.finetune.sft"):
        examples = read_sft_jsonl(path, chat_tok, max_len=128, problems=problems)
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:4"]
    assert [p.split(": ")[0] for p in problems] == [f"{path}:{n}" for n in (2, 3, 5, 6, 7)]
    assert "role" in problems[0] and "empty assistant" in problems[1] and "max_len=128" in problems[2]
    assert "not JSON" in problems[3] and "no assistant" in problems[4]
    assert all(p in caplog.text for p in problems)

    with pytest.raises(ValueError, match=rf"^{path}:2: messages\[0\]"):
        read_sft_jsonl(path, chat_tok, max_len=128, on_bad="error")
    with pytest.raises(ValueError, match="on_bad"):
        read_sft_jsonl(path, chat_tok, max_len=128, on_bad="ignore")


def test_packing_is_first_fit_with_positions_restarting():
    examples = [([1] * 5, [IGNORE_INDEX] * 5), ([2] * 4, [2] * 4), ([3] * 3, [3] * 3), ([4] * 2, [4] * 2)]
    (batch,) = pack(examples, seq_len=8, batch_size=2)
    # row 0: 5 + 3 (first fit puts the 3 back into row 0), row 1: 4 + 2, then padding
    assert batch.ids.tolist() == [[1] * 5 + [3] * 3, [2] * 4 + [4] * 2 + [0] * 2]
    assert batch.positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0, 1]]
    assert batch.document_ids.tolist() == [[0] * 5 + [1] * 3, [0] * 4 + [1] * 2 + [-1] * 2]
    assert batch.labels[1, 6:].tolist() == [IGNORE_INDEX] * 2
    targets = sft_targets(batch.labels, batch.document_ids)
    assert targets[0, 4].item() == IGNORE_INDEX  # last token of example 0 does not predict example 1
    assert targets[1, :3].tolist() == [2, 2, 2] and targets[1, 3].item() == IGNORE_INDEX
    with pytest.raises(ValueError, match="seq_len=8"):
        pack([([1] * 9, [1] * 9)], seq_len=8)


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_packed_logits_equal_each_examples_own(attention):
    torch.manual_seed(0)
    overrides = dict(vocab_size=64)
    if attention == "sparse":
        overrides.update(attention="sparse", window=4, n_global_tokens=1)
    model = ds.MoETransformer(ds.preset("tiny", **overrides)).eval()
    g = torch.Generator().manual_seed(1)
    examples = [(torch.randint(3, 64, (n,), generator=g).tolist(), [1] * n) for n in (7, 5, 9, 3)]
    (batch,) = pack(examples, seq_len=16, batch_size=4)
    with torch.no_grad():
        packed = model(batch.ids, document_ids=batch.document_ids, positions=batch.positions)
        unmasked = model(batch.ids)  # the control: the same rows without document masking
        derived = model(batch.ids, document_ids=batch.document_ids)  # positions derived from the document ids
    assert torch.equal(derived, packed)
    differs = False
    for b in range(batch.ids.shape[0]):
        for doc in batch.document_ids[b].unique().tolist():
            if doc < 0:
                continue
            where = (batch.document_ids[b] == doc).nonzero().flatten()
            with torch.no_grad():
                alone = model(batch.ids[b, where][None])[0]
            torch.testing.assert_close(packed[b, where], alone, atol=1e-5, rtol=0)
            differs |= not torch.allclose(unmasked[b, where], alone, atol=1e-5, rtol=0)
    assert differs, "without document masking a packed example must see its neighbours"


def test_document_ids_need_an_uncached_forward():
    model = ds.MoETransformer(ds.preset("tiny", vocab_size=64)).eval()
    from deepseek.nn import KVCache
    cache = KVCache.for_model(model, 1, 8)
    with pytest.raises(ValueError, match="without a KV cache"):
        model(torch.ones(1, 4, dtype=torch.long), cache=cache, document_ids=torch.zeros(1, 4, dtype=torch.long))
