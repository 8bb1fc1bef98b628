"""Steps rather than epochs: gradient accumulation normalised by the step's rows, max_steps, validation and saves
every N steps, and a run killed in the middle of an epoch that continues at the exact batch."""

import numpy as np
import pytest
import torch
from torch import nn

from conftest import KilledAt
from distill.methods.supervised import Supervised, SupervisedConfig
from distill.recipe import TrainConfig
from distill.train import fit

VOCAB, CLASSES = 50, 7


class TokenRows(torch.utils.data.Dataset):
    """Sentences of 1..12 tokens, one label per token: examples own different numbers of rows (like a tagger's
    words or a translation's target tokens), padded per batch."""

    def __init__(self, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.ids = [rng.integers(1, VOCAB, size=rng.integers(1, 13)).tolist() for _ in range(n)]

    def __len__(self):
        return len(self.ids)

    def __getitems__(self, indices):
        rows = [self.ids[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        y = torch.tensor([(t * 3 + 1) % CLASSES for r in rows for t in r])  # a learnable rule per token
        return {"ids": ids, "mask": ids != 0}, y

    def lengths(self):
        return np.array([len(r) for r in self.ids])


class Tagger(nn.Module):
    """Logits [N, C] of the real (unpadded) tokens in row-major order: the seam every token task follows."""

    def __init__(self, seed=0, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.mix, self.out = nn.Embedding(VOCAB, 16), nn.Linear(16, 16), nn.Linear(16, CLASSES)
        self.to(dtype)

    def forward(self, x):
        h, m = self.emb(x["ids"]), x["mask"].unsqueeze(-1).to(self.out.weight.dtype)
        context = (h * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)  # padding-free: as real models are
        h = h + self.mix(context)  # the loss of a token depends on its sentence
        return self.out(torch.tanh(h))[x.get("count", x["mask"])]

    def sample_completions(self, x, *, max_new_tokens, temperature):
        """A deterministic stand-in for sampling: each row continued by 1-5 tokens (by its first token), only those
        counted, so the step's rows are the generated tokens and their number varies among batches."""
        rows = [r[m].tolist() for r, m in zip(x["ids"], x["mask"])]
        new = [[(r[0] * (k + 2)) % (VOCAB - 1) + 1 for k in range(r[0] % 5 + 1)] for r in rows]
        width = max(len(r) + len(n) for r, n in zip(rows, new))
        ids = torch.tensor([r + n + [0] * (width - len(r) - len(n)) for r, n in zip(rows, new)])
        count = torch.zeros_like(ids, dtype=torch.bool)
        for b, (r, n) in enumerate(zip(rows, new)):
            count[b, len(r):len(r) + len(n)] = True
        return {"ids": ids, "mask": ids != 0, "count": count}, torch.tensor([t for n in new for t in n])


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("group_by_length", [False, True])
def test_four_batches_of_8_equal_one_batch_of_32_in_float64(group_by_length):
    """The issue's check: loss and gradients of 4 accumulated micro-batches of 8 equal those of one batch of 32
    (1e-12 in float64), however the tokens are spread among the micro-batches."""
    data = TokenRows(32)
    one = Tagger(dtype=torch.float64)
    four = Tagger(dtype=torch.float64)
    cfg = dict(epochs=1, optimizer="sgd", momentum=0.0, lr=0.5, schedule="constant", group_by_length=group_by_length)
    r1 = fit(one, Supervised(SupervisedConfig()), data, None, TrainConfig(batch_size=32, **cfg), progress=False)
    r4 = fit(four, Supervised(SupervisedConfig()), data, None, TrainConfig(batch_size=8, grad_accum=4, **cfg), progress=False)
    assert r1.history[0]["train_loss"] == pytest.approx(r4.history[0]["train_loss"], rel=1e-12, abs=0)
    for a, b in zip(_weights(one), _weights(four)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), (a - b).abs().max()
    moved = max((a - b).abs().max() for a, b in zip(_weights(one), _weights(Tagger(dtype=torch.float64))))
    assert moved > 1e-3  # the step did something: the equality is not of two untouched models


def test_an_unweighted_mean_of_micro_batch_means_would_differ():
    """The counter-check: the rows of micro-batches differ enough that averaging per-batch means is not the same
    (so the test above can fail)."""
    data = TokenRows(32)
    batches = [data.__getitems__(list(range(i, i + 8))) for i in range(0, 32, 8)]
    model = Tagger(dtype=torch.float64)
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(model(x), y) for x, y in batches]
    counts = [len(y) for _, y in batches]
    weighted = sum(c * l for c, l in zip(counts, losses)) / sum(counts)
    assert abs(float(sum(losses) / 4 - weighted)) > 1e-4


def test_max_steps_and_eval_every_give_rows_per_steps_and_end_the_schedule():
    data, val = TokenRows(200), TokenRows(40, seed=1)
    cfg = TrainConfig(batch_size=16, grad_accum=2, max_steps=20, eval_every=6, schedule="linear", warmup_steps=4, lr=0.05)
    r = fit(Tagger(), Supervised(SupervisedConfig()), data, val, cfg, progress=False)
    assert [h["step"] for h in r.history] == [6, 12, 18, 20]  # 7 steps an epoch: rows across epochs, and the last
    assert [h["epoch"] for h in r.history] == [1, 2, 3, 3]
    assert r.history[-1]["lr"] == 0.0  # linear decay reaches zero at max_steps
    assert r.history[-1]["val_loss"] < r.history[0]["val_loss"]
    assert r.best_step in (6, 12, 18, 20)


@pytest.mark.parametrize("kill_at_batch", [9, 16, 27])
def test_a_run_killed_mid_epoch_continues_at_the_exact_batch(tmp_path, kill_at_batch):
    """13 batches an epoch, 2 per step, a state every 3 steps, validation every 4: killed in the middle of an
    epoch (and of a history row), resumed to the same weights and history as the uninterrupted run."""
    data, val = TokenRows(200), TokenRows(40, seed=1)
    cfg = TrainConfig(batch_size=16, grad_accum=2, max_steps=17, eval_every=4, save_every=3, lr=0.05,
                      group_by_length=True)
    straight = Tagger()
    s = fit(straight, Supervised(SupervisedConfig()), data, val, cfg, seed=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        fit(Tagger(), KilledAt(kill_at_batch), data, val, cfg, seed=2, state_dir=tmp_path / "st", progress=False)
    resumed = Tagger(seed=7)
    torch.manual_seed(999)
    r = fit(resumed, Supervised(SupervisedConfig()), data, val, cfg, seed=2, state_dir=tmp_path / "st", resume=True,
            progress=False)
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert strip(r.history) == strip(s.history)
    for a, b in zip(_weights(straight), _weights(resumed)):
        assert torch.equal(a, b)


def test_a_teacher_giving_nan_stops_training_at_that_step():
    from distill.errors import UserError
    from distill.methods.kd import KD, KDConfig
    from distill.signals import LiveTeacher

    class Broken(Tagger):
        def forward(self, x):
            out = super().forward(x)
            return out if self.calls_left > 0 else out * float("nan")

    teacher = Broken(seed=1)
    teacher.calls_left = 0
    with pytest.raises(UserError, match=r"train: step 1 \(epoch 1, batch 1\): the teacher's logits hold NaN"):
        fit(Tagger(), KD(KDConfig(), LiveTeacher(teacher)), TokenRows(64), None, TrainConfig(batch_size=16, epochs=1),
            progress=False)


def test_a_diverging_loss_names_its_step():
    from distill.errors import UserError

    class Diverging(Supervised):  # the loss overflows at the 6th batch
        calls = 0

        def __call__(self, student, x, y):
            self.calls += 1
            loss, parts = super().__call__(student, x, y)
            return (loss * float("inf") if self.calls == 6 else loss), parts

    cfg = TrainConfig(batch_size=16, epochs=3, lr=0.01)  # 4 batches an epoch: the 6th is epoch 2's second
    with pytest.raises(UserError, match=r"train: step 6 \(epoch 2, batch 2\): the training loss became inf; lower train.lr"):
        fit(Tagger(), Diverging(SupervisedConfig()), TokenRows(64), None, cfg, progress=False)


def test_a_language_model_killed_mid_epoch_resumes_to_the_same_weights(tmp_path):
    """The issue's LLM case: a causal LM distilled with the divergence method (reverse KL, dropout on: the RNG
    state matters), steps of 2 batches, a state every 3 steps, killed in the middle of an epoch."""
    from distill.methods.divergence import Divergence, DivergenceConfig
    from distill.signals import LiveTeacher
    from distill.tasks import make_task
    from lm_fixtures import lm_recipe
    from distill.recipe import validate_recipe

    raw = lm_recipe(tmp_path)
    raw["student"]["model"]["dropout"] = 0.1
    recipe = validate_recipe(raw)
    task = make_task(recipe, None)
    data = task.load_data()
    teacher = task.build_model(recipe.teacher.model, data).eval()
    method = lambda: Divergence(DivergenceConfig(divergence="reverse_kl"), LiveTeacher(teacher))  # noqa: E731

    def student():
        torch.manual_seed(0)
        return task.build_model(recipe.student.model, data, teacher)

    cfg = TrainConfig(batch_size=8, grad_accum=2, max_steps=20, eval_every=5, save_every=3, lr=0.01)
    straight = student()
    fit(straight, method(), data.train, data.val, cfg, seed=1, progress=False, task=task)

    class Killed(Divergence):
        calls = 0

        def __call__(self, s, x, y):
            Killed.calls += 1
            if Killed.calls == 23:  # in step 12, of an epoch of 8 steps
                raise KeyboardInterrupt
            return super().__call__(s, x, y)

    with pytest.raises(KeyboardInterrupt):
        fit(student(), Killed(DivergenceConfig(divergence="reverse_kl"), LiveTeacher(teacher)), data.train, data.val,
            cfg, seed=1, state_dir=tmp_path / "st", progress=False, task=task)
    resumed = student()
    fit(resumed, method(), data.train, data.val, cfg, seed=1, state_dir=tmp_path / "st", resume=True, progress=False,
        task=task)
    for a, b in zip(_weights(straight), _weights(resumed)):
        assert torch.equal(a, b)


def test_resuming_a_finished_fit_trains_no_further_step(tmp_path):
    """The last state says training is over: resumed (e.g. killed before the caller saved the weights), the fit
    returns the same weights without one more step."""
    data, val = TokenRows(200), TokenRows(40, seed=1)
    cfg = TrainConfig(batch_size=16, max_steps=10, eval_every=5, lr=0.05)
    first = Tagger()
    fit(first, Supervised(SupervisedConfig()), data, val, cfg, seed=2, state_dir=tmp_path / "st", progress=False)
    again = Tagger(seed=3)
    r = fit(again, Supervised(SupervisedConfig()), data, val, cfg, seed=2, state_dir=tmp_path / "st", resume=True,
            progress=False)
    assert [h["step"] for h in r.history] == [5, 10]
    for a, b in zip(_weights(first), _weights(again)):
        assert torch.equal(a, b)


def test_on_policy_steps_are_normalised_by_the_generated_tokens():
    """GKD's on-policy batches: the rows of a step are the tokens the student generated (1-5 per sentence here), and
    4 accumulated batches of 8 still equal one batch of 32 (float64, 1e-12); the generated tokens carry no label."""
    from distill.methods.divergence import Divergence, DivergenceConfig
    from distill.signals import LiveTeacher

    teacher = Tagger(seed=5, dtype=torch.float64)
    config = DivergenceConfig(divergence="reverse_kl", on_policy=1.0, hard_weight=1.0, soft_weight=1.0, chunk_size=7)
    method = Divergence(config, LiveTeacher(teacher))
    x, y = TokenRows(8).__getitems__(list(range(8)))
    sampled, labels = method.sample_batch(Tagger(dtype=torch.float64), (x, y))
    assert bool((labels == -1).all()) and len(labels) == int(sampled["count"].sum()) != len(y)
    _, parts = method(Tagger(dtype=torch.float64), sampled, labels)
    assert float(parts["hard"]) == 0.0 and float(parts["soft"]) > 0

    data = TokenRows(32)
    cfg = dict(epochs=1, optimizer="sgd", momentum=0.0, lr=0.5, schedule="constant")
    one, four = Tagger(dtype=torch.float64), Tagger(dtype=torch.float64)
    fit(one, Divergence(config, LiveTeacher(teacher)), data, None, TrainConfig(batch_size=32, **cfg), progress=False)
    fit(four, Divergence(config, LiveTeacher(teacher)), data, None, TrainConfig(batch_size=8, grad_accum=4, **cfg),
        progress=False)
    for a, b in zip(_weights(one), _weights(four)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), (a - b).abs().max()
    assert max((a - b).abs().max() for a, b in zip(_weights(one), _weights(Tagger(dtype=torch.float64)))) > 1e-4
