"""`distill bench`: every variant trains in its own process and the figures come out as ratios."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distill.cli import main
from distill.speed import plain_kd_epoch


def test_bench_prints_epoch_times_memory_and_ratios_as_json(capsys):
    assert main(["bench", "--epochs", "1", "--rounds", "1", "--threads", "1", "--json"]) == 0
    printed = capsys.readouterr()
    result = json.loads(printed.out)
    assert set(result["epoch_seconds"]) == {"plain", "live", "cached", "student"}
    assert all(t > 0 for t in result["epoch_seconds"].values())
    assert all(m > 50 for m in result["start_mb"].values())  # a python process with torch and the data loaded
    assert all(result["peak_mb"][v] >= 0.99 * result["start_mb"][v] for v in result["peak_mb"])
    e = result["epoch_seconds"]
    assert abs(result["ratios"]["live / plain"] - e["live"] / e["plain"]) < 1e-12
    assert 0 <= result["cache"]["io_fraction"] <= 1 and result["cache"]["bytes"] > result["rows"] * 10 * 4
    assert result["rounds"] == 1 and result["ratio_spread"] == {}  # one round: no spread to show
    assert "one round is noise" in printed.err  # the JSON stays clean; the caution goes to stderr


def _bench_result(rounds, per_round):
    from distill.speed import VARIANTS, ratio_spread

    epoch = {v: sorted(per_round[v])[len(per_round[v]) // 2] for v in VARIANTS}
    return {"rows": 1000, "batch_size": 64, "threads": 1, "epochs_timed": 3 * rounds, "epoch_seconds": epoch,
            "peak_mb": dict.fromkeys(VARIANTS, 300.0), "start_mb": dict.fromkeys(VARIANTS, 250.0),
            "cache": {"bytes": 4e6, "seconds": 0.5, "io_fraction": 0.1, "teacher_fraction": 0.8, "top_k": None},
            "ratios": {"live / plain": epoch["live"] / epoch["plain"], "cached / student": epoch["cached"] / epoch["student"],
                       "cached / live": epoch["cached"] / epoch["live"]},
            "rounds": rounds, "round_epoch_seconds": per_round, "ratio_spread": ratio_spread(per_round)}


def test_ratio_spread_over_rounds_by_hand_and_the_one_round_note():
    from distill.speed import format_bench, ratio_spread

    per_round = {"plain": [1.0, 2.0, 1.0], "live": [1.2, 3.0, 1.5], "cached": [0.5, 0.5, 0.6], "student": [0.5, 0.4, 0.5]}
    spread = ratio_spread(per_round)  # live / plain per round: 1.2, 1.5, 1.5
    assert spread["live / plain"] == pytest.approx({"min": 1.2, "median": 1.5, "max": 1.5})
    assert spread["cached / student"] == pytest.approx({"min": 1.0, "median": 1.2, "max": 1.25})
    three = format_bench(_bench_result(3, per_round))
    assert "live / plain       1.500   per round: min 1.200, median 1.500, max 1.500" in three
    assert "over 3 rounds" in three and "noise" not in three
    one = format_bench(_bench_result(1, {v: t[:1] for v, t in per_round.items()})).splitlines()
    assert one[-1] == "note: on a shared machine one round is noise; the ratios need --rounds 3 or more"
    assert "live / plain       1.200" in one and "per round" not in "\n".join(one)
    two = format_bench(_bench_result(2, {v: t[:2] for v, t in per_round.items()}))
    assert "2 rounds give a range but no reliable median" in two and "per round: min 1.200, median 1.350, max 1.500" in two


def test_the_plain_loop_minimises_the_kd_loss_of_the_kd_method():
    """The limit loop must do the same work as ours: its loss is kd_loss at the kd method's defaults."""
    from distill.losses import kd_loss

    torch.manual_seed(0)
    x, y = torch.randn(256, 5), torch.randint(0, 3, (256,))
    teacher, student = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    s, t = student(x), teacher(x)
    ours, _ = kd_loss(s, t, y, temperature=4.0, hard_weight=0.1, soft_weight=0.9)
    plain = 0.1 * F.cross_entropy(s, y) + 0.9 * 16 * F.kl_div(F.log_softmax(s / 4, -1), F.log_softmax(t / 4, -1),
                                                               reduction="batchmean", log_target=True)
    torch.testing.assert_close(ours, plain)
    before = [p.detach().clone() for p in student.parameters()]
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    plain_kd_epoch(teacher, student, opt, x, y, 64, 4.0, torch.Generator().manual_seed(0))
    after, _ = kd_loss(student(x), t, y, temperature=4.0, hard_weight=0.1, soft_weight=0.9)
    assert after < ours and any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the peak is resettable on Linux only")
def test_the_peak_memory_counts_from_the_start_of_training_only():
    from distill.speed import _peak_memory_mb, _start_memory

    before = torch.ones(50_000_000)  # 200 MB touched and freed before training starts
    del before
    start = _start_memory()
    assert _peak_memory_mb() < start + 100
    during = torch.ones(50_000_000)  # 200 MB while training
    assert _peak_memory_mb() > start + 150
    del during
