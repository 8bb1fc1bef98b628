"""hf-shrink: a smaller student cut from a tiny Hugging Face teacher built from a config (no downloads)."""

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")  # an optional dependency: only hf-shrink needs it
from transformers import (  # noqa: E402
                          AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification,
                          BertForTokenClassification, DistilBertConfig, DistilBertForSequenceClassification,
                          ElectraConfig, ElectraForTokenClassification, ModernBertConfig,
                          ModernBertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification)

from distill.errors import UserError  # noqa: E402
from distill.students.hf_shrink import HFShrinkConfig, find_layer_list, select_layers, shrink  # noqa: E402


def bert(cls=BertForSequenceClassification):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"},
                        label2id={"neg": 0, "neu": 1, "pos": 2})
    return cls(config).eval()


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding, so the attention mask takes part
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("cls", [BertForSequenceClassification, BertForTokenClassification])
def test_kept_layers_embeddings_and_head_are_the_teachers(cls):
    teacher = bert(cls)
    student, report = shrink(teacher, HFShrinkConfig(layers=[1, 3]))
    assert type(student) is cls and student.config.num_hidden_layers == 2
    assert student.config.num_labels == 3 and student.config.id2label == teacher.config.id2label
    assert student.config.label2id == teacher.config.label2id
    assert report["kept_layers"] == [1, 3] and report["initialised_from_teacher"]
    assert report["copied_tensors"] == len(student.state_dict())
    assert report["params"] < report["teacher_params"] == sum(p.numel() for p in teacher.parameters())
    for i, t in enumerate([1, 3]):
        s_layer, t_layer = student.bert.encoder.layer[i].state_dict(), teacher.bert.encoder.layer[t].state_dict()
        assert s_layer.keys() == t_layer.keys()
        assert all(torch.equal(s_layer[k], t_layer[k]) for k in s_layer)
    for s_part, t_part in [(student.bert.embeddings, teacher.bert.embeddings), (student.classifier, teacher.classifier)]:
        assert all(torch.equal(v, t_part.state_dict()[k]) for k, v in s_part.state_dict().items())
    if cls is BertForSequenceClassification:
        assert torch.equal(student.bert.pooler.dense.weight, teacher.bert.pooler.dense.weight)
    # copies, not shared storage: training the student leaves the teacher alone
    assert student.classifier.weight.data_ptr() != teacher.classifier.weight.data_ptr()


@pytest.mark.parametrize("cls", [BertForSequenceClassification, BertForTokenClassification])
def test_student_computes_the_teacher_with_only_the_kept_layers(cls):
    teacher = bert(cls)
    student, _ = shrink(teacher, HFShrinkConfig(layers=[0, 2, 3]))
    by_hand = copy.deepcopy(teacher)
    by_hand.bert.encoder.layer = nn.ModuleList([by_hand.bert.encoder.layer[t] for t in [0, 2, 3]])
    inputs = batch()
    torch.testing.assert_close(logits(student.eval(), inputs), logits(by_hand, inputs), atol=1e-6, rtol=0)
    assert not torch.allclose(logits(student, inputs), logits(teacher, inputs))


def test_other_widths_start_random_and_run():
    teacher = bert()
    student, report = shrink(teacher, HFShrinkConfig(num_layers=2, hidden_size=16, num_heads=2, intermediate_size=32))
    assert student.config.hidden_size == 16 and student.config.intermediate_size == 32
    assert student.bert.embeddings.word_embeddings.weight.shape == (100, 16)
    assert student.classifier.weight.shape == (3, 16)
    assert not report["initialised_from_teacher"] and report["copied_tensors"] == 0
    assert "random" in report["note"] and "hidden_size 32 -> 16" in report["note"]
    assert logits(student.eval(), batch()).shape == (2, 3)
    # a narrower feed-forward alone also rules out copying the layers
    _, report = shrink(teacher, HFShrinkConfig(intermediate_size=48))
    assert not report["initialised_from_teacher"] and "intermediate_size 64 -> 48" in report["note"]


def test_no_copy_when_asked():
    student, report = shrink(bert(), HFShrinkConfig(init_from_teacher=False))
    assert not report["initialised_from_teacher"] and "init_from_teacher is false" in report["note"]


def test_head_count_change_still_copies():
    teacher = bert()
    student, report = shrink(teacher, HFShrinkConfig(layers=[0, 1], num_heads=2))
    assert student.config.num_attention_heads == 2 and student.bert.encoder.layer[0].attention.self.num_attention_heads == 2
    assert report["initialised_from_teacher"] and "num_heads 4 -> 2" in report["note"]
    assert torch.equal(student.bert.encoder.layer[1].attention.self.query.weight, teacher.bert.encoder.layer[1].attention.self.query.weight)
    assert logits(student.eval(), batch()).shape == (2, 3)


@pytest.mark.parametrize("cfg, message", [
    ({"layers": [0, 7]}, "hf-shrink.layers: teacher layer 7 does not exist: the teacher has 4 layers (0..3)"),
    ({"layers": [2, 0]}, "hf-shrink.layers: [2, 0] must be increasing without repeats, e.g. [0, 2]"),
    ({"layers": [0, 0, 1]}, "hf-shrink.layers: [0, 0, 1] must be increasing without repeats, e.g. [0, 1]"),
    ({"hidden_size": 30}, "hf-shrink.hidden_size: hidden_size 30 is not divisible by num_heads 4"),
    ({"num_heads": 5}, "hf-shrink.num_heads: hidden_size 32 is not divisible by num_heads 5"),
    ({"num_layers": 5}, "hf-shrink.num_layers: 5 is more than the teacher's 4 layers: choose 1..4"),
    ({"layers": [0], "num_layers": 1}, "hf-shrink: set layers or num_layers, not both"),
])
def test_bad_settings_are_user_errors(cfg, message):
    with pytest.raises(UserError) as e:
        shrink(bert(), HFShrinkConfig(**cfg))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_config_rejects_unknown_fields():
    with pytest.raises(ValueError):
        HFShrinkConfig(n_layers=2)


def test_layer_selection_rule():
    assert select_layers(12, 6) == [0, 2, 4, 7, 9, 11]  # Hugging Face's extract_distilbert.py
    assert select_layers(4, 2) == [0, 3]
    assert select_layers(4, 4) == [0, 1, 2, 3]
    assert select_layers(24, 1) == [0]
    assert shrink(bert(), HFShrinkConfig(num_layers=2))[1]["kept_layers"] == [0, 3]
    assert shrink(bert(), HFShrinkConfig())[1]["kept_layers"] == [0, 3]  # neither: half the layers


def test_distilbert_shrinks_through_its_own_config_names():
    torch.manual_seed(0)
    teacher = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=100, dim=32, n_layers=4, n_heads=4, hidden_dim=64, num_labels=3)).eval()
    student, report = shrink(teacher, HFShrinkConfig(layers=[1, 2]))
    assert student.config.n_layers == 2 and report["initialised_from_teacher"]
    by_hand = copy.deepcopy(teacher)
    by_hand.distilbert.transformer.layer = nn.ModuleList([by_hand.distilbert.transformer.layer[t] for t in [1, 2]])
    torch.testing.assert_close(logits(student.eval(), batch()), logits(by_hand, batch()), atol=1e-6, rtol=0)
    narrow, report = shrink(teacher, HFShrinkConfig(hidden_size=16, num_heads=2, intermediate_size=24))
    assert (narrow.config.dim, narrow.config.n_heads, narrow.config.hidden_dim) == (16, 2, 24)
    assert logits(narrow.eval(), batch()).shape == (2, 3) and not report["initialised_from_teacher"]


@pytest.mark.parametrize("config, cls", [(RobertaConfig, RobertaForSequenceClassification),
                                         (ElectraConfig, ElectraForTokenClassification)])
def test_other_bert_like_encoders_are_found(config, cls):
    torch.manual_seed(0)
    teacher = cls(config(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=64, num_labels=3)).eval()
    student, report = shrink(teacher, HFShrinkConfig(layers=[1, 3]))
    name, layers = find_layer_list(teacher, 4)
    by_hand = copy.deepcopy(teacher)
    by_hand.get_submodule(name.rsplit(".", 1)[0]).layer = nn.ModuleList([by_hand.get_submodule(name)[t] for t in [1, 3]])
    torch.testing.assert_close(logits(student.eval(), batch()), logits(by_hand, batch()), atol=1e-6, rtol=0)
    narrow, report = shrink(teacher, HFShrinkConfig(hidden_size=16, num_heads=2))
    assert logits(narrow.eval(), batch()).shape[-1] == 3 and not report["initialised_from_teacher"]


def test_a_layer_that_only_fits_its_own_position_is_refused():
    # ModernBERT's layer 0 has no attention norm, so layer 1 cannot become the student's layer 0
    torch.manual_seed(0)
    teacher = ModernBertForSequenceClassification(ModernBertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        num_labels=3, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2))
    with pytest.raises(UserError, match="hf-shrink.layers: the modernbert teacher's layers \\[1, 3\\] do not fit"):
        shrink(teacher, HFShrinkConfig(layers=[1, 3]))
    student, report = shrink(teacher, HFShrinkConfig(layers=[0, 3]))
    assert report["initialised_from_teacher"] and student.config.layer_types == [teacher.config.layer_types[t] for t in [0, 3]]


def test_a_model_without_one_layer_list_is_named():
    class Flat(nn.Module):  # stands in for e.g. ALBERT, whose layers share one set of weights
        def __init__(self):
            super().__init__()
            self.config = BertConfig(num_hidden_layers=3)
            self.config.model_type = "flat"

    with pytest.raises(UserError, match="no list of 3 layers .* in the flat teacher \\(Flat\\)"):
        find_layer_list(Flat(), 3)


def test_student_round_trips_through_save_pretrained(tmp_path):
    student, _ = shrink(bert(), HFShrinkConfig(num_layers=2, num_heads=2))
    student.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is BertForSequenceClassification and loaded.config.num_hidden_layers == 2
    assert loaded.config.num_attention_heads == 2 and loaded.config.id2label == student.config.id2label
    torch.testing.assert_close(logits(loaded, batch()), logits(student.eval(), batch()), atol=0, rtol=0)


# ----------------------------------------------------------------------------- decoder-only language models
def gpt2_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=16, n_embd=32, n_layer=4, n_head=4, bos_token_id=0,
                                      eos_token_id=0)).eval()


def llama_lm(kv_heads: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=0)).eval()


@pytest.mark.parametrize("make, layers", [(gpt2_lm, "transformer.h"), (llama_lm, "model.layers")])
def test_a_language_model_student_computes_the_teacher_with_only_the_kept_layers(make, layers):
    teacher = make()
    student, report = shrink(teacher, HFShrinkConfig(layers=[0, 3]))
    assert report["initialised_from_teacher"] and student.config.num_hidden_layers == 2
    by_hand = copy.deepcopy(teacher)
    parent, name = by_hand.get_submodule(layers.rsplit(".", 1)[0]), layers.rsplit(".", 1)[1]
    setattr(parent, name, nn.ModuleList([getattr(parent, name)[t] for t in [0, 3]]))
    inputs = {**batch(), "use_cache": False}  # (the moved layers keep their old cache index)
    torch.testing.assert_close(logits(student.eval(), inputs), logits(by_hand, inputs), atol=1e-6, rtol=0)
    tied = lambda m: m.get_output_embeddings().weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()  # noqa: E731
    assert tied(student) == tied(teacher) == (make is gpt2_lm)  # GPT-2 ties its embeddings, this Llama does not


def test_a_narrower_gpt2_follows_its_width_and_a_llama_with_fewer_heads_keeps_its_weights():
    student, report = shrink(gpt2_lm(), HFShrinkConfig(num_layers=2, hidden_size=16, num_heads=2))
    assert student.config.n_embd == 16 and student.config.n_inner is None and not report["initialised_from_teacher"]
    assert student.transformer.h[0].mlp.c_fc.weight.shape == (16, 64)  # GPT-2's default feed-forward: 4 x width
    student, _ = shrink(gpt2_lm(), HFShrinkConfig(num_layers=2, intermediate_size=48))
    assert student.config.n_inner == 48 and student.transformer.h[0].mlp.c_fc.weight.shape == (32, 48)
    teacher = llama_lm()
    student, report = shrink(teacher, HFShrinkConfig(layers=[1, 2], num_heads=2))
    assert (student.config.head_dim, student.config.num_key_value_heads) == (16, 2) and report["initialised_from_teacher"]
    assert torch.equal(student.model.layers[0].self_attn.k_proj.weight, teacher.model.layers[1].self_attn.k_proj.weight)
    assert logits(student.eval(), batch()).shape == (2, 7, 100)
    with pytest.raises(UserError, match="3 heads cannot share the teacher's 2 key/value heads"):
        shrink(llama_lm(kv_heads=2), HFShrinkConfig(hidden_size=24, num_heads=3))
