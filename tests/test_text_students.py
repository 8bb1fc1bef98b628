"""Text students on the teacher's token ids: BiLSTMText and TextCNN, as token taggers and sentence classifiers."""

import numpy as np
import pytest
import torch

from distill.errors import UserError
from distill.students.bilstm import BiLSTMConfig, BiLSTMText
from distill.students.text_embeddings import embedding_from_teacher
from distill.students.textcnn import TextCNN, TextCNNConfig

PAD = 0
MODELS = {"bilstm": (BiLSTMText, BiLSTMConfig), "textcnn": (TextCNN, TextCNNConfig)}
KINDS = [(kind, token_level) for kind in MODELS for token_level in (True, False)]


def build(kind, token_level, vocab_size=50, num_classes=3, teacher=None, **overrides):
    model_class, config_class = MODELS[kind]
    return model_class(config_class(**overrides), vocab_size=vocab_size, num_classes=num_classes, pad_id=PAD,
                       token_level=token_level, teacher_embeddings=teacher)


def batch(lengths, vocab_size=50, seed=0):
    """Right-padded random ids; word_mask marks about 2/3 of the real positions (position 0 always)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(1, vocab_size, (len(lengths), width), generator=g)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    words = mask & (torch.rand(ids.shape, generator=g) < 0.67)
    words[:, 0] = True
    return {"input_ids": ids.masked_fill(~mask, PAD), "attention_mask": mask.long(), "word_mask": words}


@pytest.mark.parametrize("kind,token_level", KINDS)
def test_shapes(kind, token_level):
    inputs = batch([5, 9, 2])
    logits = build(kind, token_level)(inputs)
    assert logits.shape == ((int(inputs["word_mask"].sum()), 3) if token_level else (3, 3))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # the 4 checks even kernels too
@pytest.mark.parametrize("kind,token_level", KINDS)
def test_padding_does_not_change_a_row(kind, token_level):
    torch.manual_seed(0)
    extra = {"kernel_sizes": [3, 4, 5]} if kind == "textcnn" else {"layers": 2}
    model = build(kind, token_level, **extra)
    model.eval()
    both = batch([6, 11], seed=1)
    alone = {key: value[:1, :6] for key, value in both.items()}
    batched = model(both)
    if token_level:  # row-major: row 0's word positions come first
        batched = batched[: int(alone["word_mask"].sum())]
    else:
        batched = batched[:1]
    torch.testing.assert_close(model(alone), batched, atol=1e-6, rtol=0)


def test_bilstm_refuses_left_padding():
    inputs = batch([3, 5])
    inputs = {key: value.flip(1) for key, value in inputs.items()}
    with pytest.raises(UserError, match="padding_side"):
        build("bilstm", False)(inputs)


def test_textcnn_accepts_left_padding():
    torch.manual_seed(0)
    model = build("textcnn", False).eval()
    right = batch([3, 5])
    left = {key: torch.stack([value[0].roll(2), value[1]]) for key, value in right.items()}
    torch.testing.assert_close(model(left), model(right), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind,token_level", KINDS)
def test_gradients_reach_every_parameter(kind, token_level):
    torch.manual_seed(0)
    model = build(kind, token_level, layers=2) if kind == "bilstm" else build(kind, token_level)
    model(batch([5, 9, 2])).logsumexp(-1).sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_embeddings_copied_exactly_when_widths_match():
    teacher = torch.randn(50, 128)
    for kind in MODELS:
        assert torch.equal(build(kind, True, teacher=teacher).embedding.weight, teacher)
        assert not torch.equal(build(kind, True, teacher=teacher, init_embeddings=False).embedding.weight, teacher)


def test_projection_keeps_pairwise_structure_best():
    """The student's Gram matrix is, up to one scale, the teacher's best rank-k centred Gram (Eckart-Young), as an
    independent float64 numpy SVD finds it; and the rows' std equals the teacher's."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(200, 48, generator=g) @ torch.diag(torch.linspace(3, 0.1, 48)) + 0.5
    student = embedding_from_teacher(200, 16, PAD, teacher).weight.detach().double().numpy()
    centred = teacher.double().numpy() - teacher.double().numpy().mean(0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    best = (u[:, :16] * s[:16] ** 2) @ u[:, :16].T
    gram = student @ student.T
    scale = (gram * best).sum() / (best * best).sum()
    np.testing.assert_allclose(gram / scale, best, atol=1e-6 * np.abs(best).max())  # the weight is float32
    assert student.std(ddof=1) == pytest.approx(teacher.double().std().item(), rel=1e-6)


def test_projection_pads_extra_columns_with_small_values():
    teacher = torch.randn(40, 8)
    weight = embedding_from_teacher(40, 12, PAD, teacher).weight.detach().double()
    centred = teacher.double() - teacher.double().mean(0)
    gram = weight[:, :8] @ weight[:, :8].T  # all 8 axes kept: a rotation of the centred rows, rescaled
    target = centred @ centred.T
    torch.testing.assert_close(gram / gram.trace() * target.trace(), target, atol=1e-6 * target.abs().max(), rtol=0)
    assert 0 < weight[:, 8:].std() < 0.05 * teacher.std()


def test_projection_is_deterministic():
    teacher = torch.randn(60, 32)
    first, second = (embedding_from_teacher(60, 10, PAD, teacher).weight for _ in range(2))
    assert torch.equal(first, second)


@pytest.mark.parametrize("kind", MODELS)
def test_vocab_mismatch_is_a_user_error(kind):
    with pytest.raises(UserError, match=r"\(49, 128\).*vocab_size is 50"):
        build(kind, False, teacher=torch.randn(49, 128))


def test_parameter_counts_at_bert_vocab():
    """Default configs, vocab 30522 (BERT's), 2 classes. Embeddings are 30522 * 128 = 3,906,816 of each:
    BiLSTMText 4,171,522 (LSTM 264,192 + head 514); TextCNN tagger 4,038,402 (convs 131,328 + head 258),
    TextCNN classifier 4,038,658 (head 514)."""
    counts = {(kind, level): sum(p.numel() for p in build(kind, level, vocab_size=30522, num_classes=2).parameters())
              for kind, level in KINDS}
    print(counts)
    assert counts == {("bilstm", True): 4_171_522, ("bilstm", False): 4_171_522,
                      ("textcnn", True): 4_038_402, ("textcnn", False): 4_038_658}


def synthetic(n, vocab_size, seed, token_level):
    """Sentence label: token 7 appears (half the rows). Tag: the token is one of a fixed half of the ids."""
    g = torch.Generator().manual_seed(seed)
    inputs = batch(torch.randint(4, 13, (n,), generator=g).tolist(), vocab_size, seed)
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    if token_level:
        tagged = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(1))[: vocab_size // 2]
        return inputs, torch.isin(ids, tagged)[inputs["word_mask"]].long()
    ids[ids == 7] = 8
    has = torch.rand(n, generator=g) < 0.5
    where = (torch.rand(ids.shape, generator=g) * real).argmax(1)  # one real position per row
    ids[has, where[has]] = 7
    return inputs, has.long()


@pytest.mark.parametrize("kind,token_level", KINDS)
def test_learns_a_synthetic_task(kind, token_level):
    torch.manual_seed(0)
    width = {"hidden" if kind == "bilstm" else "channels": 32}
    model = build(kind, token_level, num_classes=2, embedding_dim=32, **width)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(300):
        inputs, labels = synthetic(32, 50, step, token_level)
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    inputs, labels = synthetic(512, 50, 10_000, token_level)
    with torch.no_grad():
        accuracy = (model.eval()(inputs).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.9, accuracy
