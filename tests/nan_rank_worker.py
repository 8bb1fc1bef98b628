"""Run by tests/test_distributed.py under torchrun: `distill distill RECIPE` where process 1 is given a teacher
whose logits hold NaN and process 0 a finite one, so only one process's check finds it (as when a NaN reaches one
process's share of a batch).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/nan_rank_worker.py RECIPE GOOD BAD [key=value ...]
"""

import os
import sys

from distill.cli import main

if __name__ == "__main__":
    recipe, good, bad, *overrides = sys.argv[1:]
    teacher = bad if os.environ["RANK"] == "1" else good
    sys.exit(main(["distill", recipe, "--quiet", "--teacher", teacher, "--no-scratch", *overrides]))
