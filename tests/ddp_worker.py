"""Run by tests/test_distributed.py under torchrun: distil a digits student with `fit` and save its weights.

    python -m torch.distributed.run --standalone --nproc_per_node N tests/ddp_worker.py TEACHER OUT METHOD
Also imported by the test to make the same run in one process.
"""

import sys

import safetensors.torch
import torch

from distill.checkpoint import load_model_file
from distill.data import ArrayDataset, load_dataset
from distill.methods import DISTILL_METHODS, build_method
from distill.recipe import TrainConfig
from distill.signals import LiveTeacher
from distill.students import MLPConfig, build_model
from distill.train import fit, make_accelerator

ROWS = 1024  # a whole number of global batches: Accelerate pads an incomplete last batch
PARAMS = {"kd": {"temperature": 4.0}, "hints": {"student_layer": "net.1", "teacher_layer": "net.1"}}


def distil(teacher_path: str, method_name: str) -> torch.nn.Module:
    torch.set_num_threads(1)
    data = load_dataset("digits")
    train = ArrayDataset(data.train.x[:ROWS], data.train.y[:ROWS])
    teacher = build_model(MLPConfig(hidden=[64]), data.input_shape, 10)
    teacher.load_state_dict(load_model_file(teacher_path)[0])
    torch.manual_seed(0)
    student = build_model(MLPConfig(hidden=[16]), data.input_shape, 10)
    method = build_method(DISTILL_METHODS[method_name].Config(method=method_name, **PARAMS[method_name]), LiveTeacher(teacher))
    fit(student, method, train, data.val, TrainConfig(epochs=3, batch_size=64, lr=0.003), seed=0,
        accelerator=make_accelerator(cpu=True), progress=False)
    return student


if __name__ == "__main__":
    teacher_path, out, method_name = sys.argv[1:4]
    student = distil(teacher_path, method_name)
    if torch.distributed.get_rank() == 0:
        safetensors.torch.save_file({k: v.contiguous() for k, v in student.state_dict().items()}, out)
