import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"offline data folder {SHARED_DATA} is absent (it sits beside the repo on dev and CI machines)")
    return SHARED_DATA


def tiny_recipe(tmp_path, **sections) -> dict:
    """A digits recipe that trains in seconds; sections override whole top-level keys."""
    raw = {
        "name": "tiny",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "digits"},
        "teacher": {"model": {"kind": "mlp", "hidden": [128]}, "train": {"epochs": 4, "batch_size": 64, "lr": 0.003}},
        "student": {"model": {"kind": "mlp", "hidden": [16]}, "train": {"epochs": 3, "batch_size": 64, "lr": 0.003}},
        "distill": {"method": "kd", "temperature": 4},
        "report": {"repeats": 3, "throughput_batch": 32},
    }
    raw.update(sections)
    return raw
