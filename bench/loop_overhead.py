"""Per-batch overhead of distill's training loop over a minimal hand-written KD loop, in microseconds.

    OMP_NUM_THREADS=1 python bench/loop_overhead.py [--rows 60000] [--batch-size 256] [--epochs 4]

Teacher and student are one 32 -> 10 linear layer each, so the arithmetic costs almost nothing and the
difference between the two loops is their software overhead: data loading, the loss and its checks, the
optimizer and scheduler steps, logging. Both run the same loss (distill.speed.plain_kd_epoch's docstring), the
same optimizer and the same batch size on random data, in one process, alternating epoch by epoch; the first
epoch of each is not counted. `distill bench` measures what this overhead amounts to on a real model.
"""

import argparse
import statistics
import sys

import torch
from torch import nn

from distill.data import ArrayDataset
from distill.methods.kd import KD, KDConfig
from distill.recipe import TrainConfig
from distill.signals import LiveTeacher
from distill.speed import plain_kd_epoch
from distill.train import fit, make_accelerator, make_optimizer


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=60_000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=4, help="epochs of each loop (the first one is not counted)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.rows < 1 or args.batch_size < 1 or args.epochs < 2 or args.threads < 1:
        print("error: --rows, --batch-size and --threads must be >= 1 and --epochs >= 2", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(args.rows, 32), torch.randint(0, 10, (args.rows,))
    teacher = nn.Linear(32, 10).eval()
    plain_student, distill_student = nn.Linear(32, 10), nn.Linear(32, 10)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.01, optimizer="sgd", momentum=0.9, schedule="constant")
    optimizer = make_optimizer(plain_student.parameters(), cfg)
    generator = torch.Generator().manual_seed(0)
    method = KD(KDConfig(temperature=4.0, hard_weight=0.1, soft_weight=0.9), LiveTeacher(teacher))
    data, accelerator = ArrayDataset(x, y), make_accelerator(cpu=True)
    batches = -(-args.rows // args.batch_size)
    plain, ours = [], []
    for _ in range(args.epochs):
        plain.append(plain_kd_epoch(teacher, plain_student, optimizer, x, y, args.batch_size, 4.0, generator))
        ours.append(fit(distill_student, method, data, None, cfg, accelerator=accelerator, progress=False).train_seconds)
    per_batch = {name: 1e6 * statistics.median(times[1:]) / batches for name, times in (("plain", plain), ("distill", ours))}
    print(f"{batches} batches of {args.batch_size} an epoch, median of {args.epochs - 1} epochs, {args.threads} thread(s)")
    print(f"plain loop   {per_batch['plain']:8.1f} us a batch")
    print(f"distill loop {per_batch['distill']:8.1f} us a batch")
    print(f"overhead     {per_batch['distill'] - per_batch['plain']:8.1f} us a batch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
