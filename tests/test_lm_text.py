"""Language-model data: which positions count and what y holds for plain text, prompt/completion and chat rows,
packing, and the one-line refusals of files a user may get wrong."""

import gzip

import numpy as np
import pytest
import torch
from lm_fixtures import documents, make_tokenizer, write_jsonl

from distill.data.lm_text import LMExample, read_lm_file, tokenize_examples
from distill.errors import UserError


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(chat=True)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_plain_text_counts_every_next_token_and_y_follows_row_major_order(tok):
    texts = ["the film was good .", "the plot was dull and the actor was sad ."]
    rows = tokenize_examples(tok, [LMExample("x", t) for t in texts], max_length=64)
    inputs, y = rows.__getitems__([0, 1])
    eos = tok.eos_token_id  # the trained tokenizer's </s> also starts a text
    expected = [[eos, *ids(tok, t), eos] for t in texts]
    longest = max(map(len, expected))
    assert inputs["input_ids"].tolist() == [r + [tok.pad_token_id] * (longest - len(r)) for r in expected]
    mask = [[t < len(r) - 1 for t in range(longest)] for r in expected]  # position t predicts token t + 1
    assert inputs["target_mask"].tolist() == mask
    assert y.tolist() == [tok_id for r in expected for tok_id in r[1:]]
    assert rows.row_counts().tolist() == [len(r) - 1 for r in expected]
    assert rows.lengths().tolist() == [len(r) for r in expected]


def test_prompt_completion_counts_only_the_completion_and_its_end(tok):
    rows = tokenize_examples(tok, [LMExample("x", " was good .", prompt="the film"),
                                   LMExample("y", " sad .", prompt="the plot was dull and the actor was")], max_length=64)
    inputs, y = rows.__getitems__([0, 1])
    eos = tok.eos_token_id
    for b, (prompt, completion) in enumerate([("the film", " was good ."), ("the plot was dull and the actor was", " sad .")]):
        p, c = [eos, *ids(tok, prompt)], [*ids(tok, completion), eos]
        counted = inputs["target_mask"][b].nonzero().flatten().tolist()
        assert counted == list(range(len(p) - 1, len(p) + len(c) - 1))  # the last prompt token predicts the first of c
    expected_y = [*ids(tok, " was good ."), eos, *ids(tok, " sad ."), eos]
    assert y.tolist() == expected_y
    assert tok.decode(y[: rows.row_counts()[0]], skip_special_tokens=True).strip() == "was good ."


def test_chat_rows_render_with_the_template_and_count_the_last_assistant_turn(tok, tmp_path):
    messages = [{"role": "user", "content": "the film"}, {"role": "assistant", "content": "was good"},
                {"role": "user", "content": "and the plot"}, {"role": "assistant", "content": "was dull"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    fmt, examples = read_lm_file(path)
    assert fmt == "chat"
    rows = tokenize_examples(tok, examples, max_length=256)
    inputs, y = rows.__getitems__([0])
    prompt = "<|user|>the film</s><|assistant|>was good</s><|user|>and the plot</s><|assistant|>"
    completion = "was dull</s>"  # the last assistant turn and its end, nothing before; tokenized apart from the prompt
    assert inputs["input_ids"][0].tolist() == ids(tok, prompt) + ids(tok, completion)
    assert y.tolist() == ids(tok, completion) and rows.prompt(0) == ids(tok, prompt)


def test_packing_predicts_every_token_of_the_stream_once_without_padding(tok):
    texts = documents(12, seed=3)
    rows = tokenize_examples(tok, [LMExample("x", t) for t in texts], max_length=16, pack=True)
    eos = tok.eos_token_id
    stream = [eos]
    for t in texts:  # each text followed by </s>, which also starts the next one
        stream += [*ids(tok, t), eos]
    inputs, y = rows.__getitems__(list(range(len(rows))))
    assert y.tolist() == stream[1:]
    assert max(rows.lengths()) == 16 and int(rows.row_counts().sum()) == len(stream) - 1
    assert bool(inputs["attention_mask"][:-1].all())  # only the last block may be shorter


def test_a_long_document_is_cut_to_max_length(tok):
    rows = tokenize_examples(tok, [LMExample("x", " ".join(documents(5)))], max_length=10)
    assert rows.lengths().tolist() == [10] and rows.row_counts().tolist() == [9]


def test_files_in_each_format_are_read_and_gzip_is_accepted(tmp_path):
    text = tmp_path / "docs.txt.gz"
    text.write_bytes(gzip.compress(b"the film was good .\n\n  the plot was dull .\n"))
    assert read_lm_file(text) == ("text", [LMExample(f"{text} line 1", "the film was good ."),
                                           LMExample(f"{text} line 3", "the plot was dull .")])
    rows = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "the film", "completion": " was good ."}])
    assert read_lm_file(rows) == ("prompt_completion", [LMExample(f"{rows} line 1", " was good .", prompt="the film")])
    own = write_jsonl(tmp_path / "t.jsonl", [{"body": "the film was good ."}])
    assert read_lm_file(own, text_field="body")[1][0].completion == "the film was good ."


@pytest.mark.parametrize("lines, message", [
    (['{"text": "fine"}', "{not json"], "line 2: not valid JSON"),
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a"}'], "line 2: needs a non-empty 'completion' string"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], "line 1: the last message is the user's"),
    (['{"messages": [{"role": "user"}]}'], "line 1: needs 'messages'"),
    (['{"title": "x"}'], "line 1 has keys \\['title'\\]"),
])
def test_malformed_lines_are_refused_with_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=message) as e:
        read_lm_file(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_prompt_that_leaves_no_room_is_refused_naming_the_row(tok):
    long_prompt = " ".join(documents(3))
    examples = [LMExample("data.jsonl line 1", " good .", prompt="the film"),
                LMExample("data.jsonl line 2", " good .", prompt=long_prompt)]
    with pytest.raises(UserError, match="data.jsonl line 2: the prompt takes .* no room for its completion within "
                                        "data.max_length=16: raise data.max_length or shorten that prompt"):
        tokenize_examples(tok, examples, max_length=16)


def test_chat_data_with_a_tokenizer_without_a_template_is_refused():
    chat = [LMExample("f line 1", messages=({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}))]
    with pytest.raises(UserError, match="chat template, but the tokenizer has none"):
        tokenize_examples(make_tokenizer(), chat, max_length=32, source="f")


def test_packing_prompt_completion_rows_is_refused(tok):
    with pytest.raises(UserError, match="data.pack joins plain-text documents"):
        tokenize_examples(tok, [LMExample("x", " good", prompt="the film")], max_length=16, pack=True)


def test_subset_and_sha256_follow_the_rows(tok):
    rows = tokenize_examples(tok, [LMExample("x", t) for t in documents(4)], max_length=32)
    sub = rows.subset([2, 0])
    assert sub.ids == [rows.ids[2], rows.ids[0]] and sub.sha256() != rows.sha256()
    assert rows.subset(range(4)).sha256() == rows.sha256()
    assert np.array_equal(sub.row_counts(), rows.row_counts()[[2, 0]])
    inputs, y = rows.__getitems__([1])
    assert y.dtype == torch.long and inputs["target_mask"].dtype == torch.bool
