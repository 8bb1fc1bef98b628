"""Run by tests/test_distributed.py under torchrun: `distill ARGS...` with the runner's accelerator in FSDP2
mode (see ddp_worker.fsdp_accelerator: Accelerate sets FSDP up on GPUs only)."""

import sys

import distill.runner
from ddp_worker import fsdp_accelerator
from distill.cli import main

if __name__ == "__main__":
    distill.runner.make_accelerator = lambda mixed_precision="no": fsdp_accelerator()
    sys.exit(main(sys.argv[1:]))
