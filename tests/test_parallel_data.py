"""Parallel text for translation: readers and their one-line refusals, the shared subword tokenizer, teacher-forced
batches whose y lines up with the counted target positions, and word-level KD over those positions checked against
a float64 computation written from Kim & Rush (2016), eq. for word-level KD: per target position j of each sentence,
-sum_k q(y_j = k | ...) log p(y_j = k | ...), averaged over all real target tokens of the batch."""

import gzip
import math

import pytest
import torch

from distill.data.parallel import TokenizedPairs, read_pairs, tokenize_pairs, train_tokenizer
from distill.errors import UserError
from distill.methods.kd import KD, KDConfig
from distill.signals import LiveTeacher
from distill.students.seq2seq import Seq2SeqConfig, build_marian

PAIRS = [("the film is good", "la película es buena"), ("the actor is bad", "el actor es malo"),
         ("a good film", "una buena película"), ("I liked the music", "me gustó la música")] * 5


def test_tsv_with_header_jsonl_and_aligned_files_give_the_same_pairs(tmp_path):
    (tmp_path / "p.tsv").write_text("en\tes\n" + "".join(f"{s}\t{t}\n" for s, t in PAIRS))
    (tmp_path / "p.jsonl").write_text("".join(f'{{"en": "{s}", "es": "{t}"}}\n' for s, t in PAIRS))
    (tmp_path / "a.en").write_text("".join(f"{s}\n" for s, _ in PAIRS))
    (tmp_path / "a.es").write_text("".join(f"{t}\n" for _, t in PAIRS))
    (tmp_path / "n.tsv.gz").write_bytes(gzip.compress("".join(f"7\t{s}\t{t}\n" for s, t in PAIRS).encode()))
    assert read_pairs(tmp_path / "p.tsv", source_column="en", target_column="es") == PAIRS
    assert read_pairs(tmp_path / "p.jsonl", source_column="en", target_column="es") == PAIRS
    assert read_pairs(tmp_path / "a.en", target_path=tmp_path / "a.es") == PAIRS
    assert read_pairs(tmp_path / "n.tsv.gz", source_column=1, target_column=2) == PAIRS  # en-es: id, en, es


@pytest.mark.parametrize("files, kwargs, message", [
    ({"a.en": "one\ntwo\nthree\n", "a.es": "uno\ndos\n"}, {"target_path": "a.es"},
     r"a.en has 3 lines but .*a.es has 2: .*first line without a partner is line 3"),
    ({"p.tsv": "en\tes\nhello\thola\n\tvacío\n"}, {}, r"p.tsv line 3: empty source sentence"),
    ({"p.tsv": "en\tes\nhello\n"}, {}, r"p.tsv line 2: 1 tab-separated column\(s\), expected at least 2"),
    ({"p.tsv": "english\tspanish\nhello\thola\n"}, {}, r"no column 'en' in its header"),
    ({"p.jsonl": '{"en": "hi", "es": "hola"}\n{"en": "hi"\n'}, {}, r"p.jsonl line 2: not valid JSON"),
    ({"p.jsonl": '{"en": "hi", "es": ""}\n'}, {}, r"p.jsonl line 1: empty target sentence"),
    ({"p.csv": "en,es\n"}, {}, r"must be .tsv, .jsonl"),
])
def test_bad_parallel_data_is_refused_with_its_line(tmp_path, files, kwargs, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    first = next(iter(files))
    if "target_path" in kwargs:
        kwargs = {"target_path": tmp_path / kwargs["target_path"]}
    else:
        kwargs = {"source_column": "en", "target_column": "es"}
    with pytest.raises(UserError, match=message) as e:
        read_pairs(tmp_path / first, **kwargs)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([s for p in PAIRS for s in p], vocab_size=300)


def test_the_tokenizer_is_shared_ends_sentences_and_round_trips(tokenizer):
    ids = tokenizer("la película es buena")["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.pad_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "la película es buena"
    assert tokenizer.decode(tokenizer("the film is good")["input_ids"], skip_special_tokens=True).strip() == "the film is good"


def test_batches_teacher_force_and_y_lists_the_counted_target_tokens(tokenizer):
    data = tokenize_pairs(tokenizer, PAIRS[:3], max_length=32, start_id=tokenizer.pad_token_id)
    inputs, y = data.__getitems__([2, 0])
    targets = [data.targets[2], data.targets[0]]
    assert y.tolist() == targets[0] + targets[1]  # row-major, each ending in </s>
    mask = inputs["decoder_attention_mask"].bool()
    assert mask.sum().item() == len(y) and data.row_counts()[[2, 0]].tolist() == [len(t) for t in targets]
    for b, t in enumerate(targets):  # decoder input: start token, then the target shifted right
        assert inputs["decoder_input_ids"][b, : len(t)].tolist() == [tokenizer.pad_token_id, *t[:-1]]
    cut = tokenize_pairs(tokenizer, PAIRS[:1], max_length=3, start_id=0)
    assert len(cut.targets[0]) == 3 and cut.targets[0][-1] == tokenizer.eos_token_id  # </s> kept when cut
    assert data.sha256() != tokenize_pairs(tokenizer, PAIRS[1:4], 32, 0).sha256()


def _tiny(tokenizer, seed):
    torch.manual_seed(seed)
    config = Seq2SeqConfig(encoder_layers=1, decoder_layers=1, d_model=16, heads=2, ffn_dim=32, dropout=0.0, max_positions=64)
    return build_marian(config, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)


def test_word_level_kd_is_the_per_token_mean_over_real_target_tokens(tokenizer):
    """Sentences of different target lengths in one batch: padding must not count, and the loss is the mean over the
    batch's real target tokens (not over sentences, not over padded positions)."""
    teacher, student = _tiny(tokenizer, 0).eval(), _tiny(tokenizer, 1).eval()
    data = tokenize_pairs(tokenizer, [PAIRS[0], PAIRS[2], PAIRS[3]], max_length=32, start_id=tokenizer.pad_token_id)
    inputs, y = data.__getitems__([0, 1, 2])
    assert len(set(data.row_counts().tolist())) > 1  # the batch is padded
    T, w_hard, w_soft = 2.0, 0.3, 0.7
    loss, _ = KD(KDConfig(temperature=T, hard_weight=w_hard, soft_weight=w_soft), LiveTeacher(teacher))(student, inputs, y)

    # independent: full decoder outputs, walk every sentence and every real position in float64
    def full(model):
        return model.hf(**inputs).logits.detach().double()
    s_all, t_all, mask = full(student), full(teacher), inputs["decoder_attention_mask"]
    soft = hard = 0.0
    tokens = 0
    for b in range(s_all.shape[0]):
        for j in range(s_all.shape[1]):
            if not mask[b, j]:
                continue
            target = inputs["decoder_input_ids"][b, j + 1].item() if j + 1 < mask.shape[1] and mask[b, j + 1] else tokenizer.eos_token_id
            p_t = torch.softmax(t_all[b, j] / T, -1)
            log_p_s = torch.log_softmax(s_all[b, j] / T, -1)
            soft += T * T * float((p_t * (torch.log(p_t) - log_p_s)).sum())
            hard += -float(torch.log_softmax(s_all[b, j], -1)[target])
            tokens += 1
    expected = w_hard * hard / tokens + w_soft * soft / tokens
    assert tokens == len(y)
    assert math.isclose(float(loss.detach()), expected, rel_tol=1e-5)


def test_translate_decodes_greedy_and_beam(tokenizer):
    model = _tiny(tokenizer, 0)
    inputs, _ = tokenize_pairs(tokenizer, PAIRS[:2], 32, tokenizer.pad_token_id).__getitems__([0, 1])
    greedy, beam = model.translate(inputs, max_new_tokens=5), model.translate(inputs, num_beams=3, max_new_tokens=5)
    assert greedy.shape[0] == beam.shape[0] == 2 and greedy.shape[1] <= 6 and model.training


def test_pairs_of_other_lengths_are_refused():
    with pytest.raises(ValueError, match="2 sources but 1 targets"):
        TokenizedPairs([[1], [2]], [[3]], 0, 0)
