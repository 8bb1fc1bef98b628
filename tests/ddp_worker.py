"""Run by tests/test_distributed.py under torchrun: distil a digits student with `fit` and save its weights.

    python -m torch.distributed.run --standalone --nproc_per_node N tests/ddp_worker.py \
        --teacher T --out OUT --method kd [--cache DIR] [--engine ddp|fsdp] [--state-dir D [--kill-at-step K]]
With --cache (a folder from write_cache over the same rows) the method learns from it instead of the live
teacher; --state-dir keeps a resumable checkpoint there (and resumes one), --kill-at-step stops the run there
as a kill would. Also imported by the test to make the same run in one process.
"""

import argparse
import os
import sys

import safetensors.torch
import torch

from distill.checkpoint import load_model_file
from distill.data import ArrayDataset, load_dataset
from distill.methods import DISTILL_METHODS, build_method
from distill.recipe import TrainConfig
from distill.signals import CachedDataset, CachedTeacher, LiveTeacher, open_cache
from distill.students import MLPConfig, build_model
from distill.train import end_distributed, fit, make_accelerator
from distill.training_state import is_sharded

ROWS = 1024  # a whole number of global batches: Accelerate pads an incomplete last batch
PARAMS = {"kd": {"temperature": 4.0}, "hints": {"student_layer": "net.1", "teacher_layer": "net.1"}}


def rows() -> ArrayDataset:
    data = load_dataset("digits")
    return ArrayDataset(data.train.x[:ROWS], data.train.y[:ROWS])


def load_teacher(teacher_path: str) -> torch.nn.Module:
    teacher = build_model(MLPConfig(hidden=[64]), (1, 8, 8), 10)
    teacher.load_state_dict(load_model_file(teacher_path)[0])
    return teacher


def fsdp_accelerator():
    """An Accelerator in FSDP2 mode on CPU processes (gloo). Accelerate sets FSDP up on GPUs only, so its state
    is switched to FSDP by hand after construction (a test-only step): what runs then is distill's FSDP path,
    sharded training, gathered checkpoints and resume, as on GPUs."""
    from accelerate import Accelerator, DataLoaderConfiguration, FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["Linear"])  # each layer its own unit
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin, dataloader_config=DataLoaderConfiguration(split_batches=True))
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # AcceleratorState copies PartialState's
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    return accelerator


class Killed(Exception):
    """Stands for a kill in the middle of an epoch."""


def distil(teacher_path: str, method_name: str, cache: str | None = None, engine: str = "ddp",
           state_dir: str | None = None, kill_at_step: int | None = None) -> torch.nn.Module:
    torch.set_num_threads(1)
    data, train = load_dataset("digits"), rows()
    signal = LiveTeacher(load_teacher(teacher_path))
    if cache:
        train, signal = CachedDataset(train, open_cache(cache, dataset=train)), CachedTeacher()
    torch.manual_seed(0)
    # max_norm: the weight constraint after each step must act on the (under FSDP, sharded) rows alike
    student = build_model(MLPConfig(hidden=[16], max_norm=0.5), data.input_shape, 10)
    method = build_method(DISTILL_METHODS[method_name].Config(method=method_name, **PARAMS[method_name]), signal)
    method.__class__ = _counted(type(method), kill_at_step)
    accelerator = fsdp_accelerator() if engine == "fsdp" else make_accelerator(cpu=True)
    fit(student, method, train, data.val, TrainConfig(epochs=3, batch_size=64, lr=0.003), seed=0,
        accelerator=accelerator, state_dir=state_dir, resume=state_dir is not None, progress=False)
    print(f"batches trained: {type(method).calls}, sharded: {type(method).sharded}")
    return student


def _counted(method_class, kill_at: int | None):
    """The method's class, counting the batches it is called on and raising Killed on the `kill_at`-th."""

    class Counted(method_class):
        calls = 0

        def __call__(self, *args):
            type(self).calls += 1
            type(self).sharded = is_sharded(args[0])  # the student it trains: FSDP-sharded or not
            if type(self).calls == kill_at:
                raise Killed(f"killed at step {kill_at}")
            return super().__call__(*args)

    return Counted


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--cache")
    parser.add_argument("--engine", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--state-dir")
    parser.add_argument("--kill-at-step", type=int)
    args = parser.parse_args()
    student = distil(args.teacher, args.method, args.cache, args.engine, args.state_dir, args.kill_at_step)
    if torch.distributed.get_rank() == 0:
        safetensors.torch.save_file({k: v.contiguous() for k, v in student.state_dict().items()}, args.out)
    end_distributed()
    # the work is done and written; skip the interpreter's teardown, where gloo's threads have still aborted a
    # finished FSDP worker ('terminate called without an active exception', 1 in ~7 full test runs)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
