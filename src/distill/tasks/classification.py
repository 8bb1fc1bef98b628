"""Classification: accuracy / error count on labelled rows, and the image jitter used by Hinton's teacher."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader


@torch.inference_mode()
def evaluate(model: nn.Module, dataset, *, batch_size: int = 1024, device: torch.device | str = "cpu") -> dict:
    """Accuracy, error count and mean cross-entropy over the labelled rows (label >= 0) of `dataset`."""
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for x, y in _batches(dataset, batch_size):
        x, y = x.to(device), y.to(device)
        keep = y >= 0
        if not keep.any():
            continue
        logits = model(x[keep]).float()
        loss_sum += F.cross_entropy(logits, y[keep], reduction="sum").item()
        correct += (logits.argmax(-1) == y[keep]).sum().item()
        total += int(keep.sum())
    model.train(was_training)
    if total == 0:
        return {"accuracy": float("nan"), "errors": 0, "loss": float("nan"), "n": 0}
    return {"accuracy": correct / total, "errors": total - correct, "loss": loss_sum / total, "n": total}


def _batches(data, batch_size: int):
    """In-order (x, y) batches: slices of an in-memory dataset, or a DataLoader over any other (x, y) dataset."""
    if isinstance(data, DataLoader):
        yield from data
    elif hasattr(data, "x") and hasattr(data, "y"):
        for start in range(0, len(data.y), batch_size):
            yield data.x[start : start + batch_size], data.y[start : start + batch_size]
    else:
        yield from DataLoader(data, batch_size=batch_size)


def random_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image of a (N, C, H, W) batch by its own random (dy, dx) in [-max_shift, max_shift],
    filling with zeros (Hinton et al. 2015 jitter the MNIST teacher's inputs by up to 2 pixels).
    Uses the global torch RNG, so checkpoints that restore it resume identically."""
    if max_shift <= 0:
        return x
    if x.dim() != 4:
        return x  # not an image batch: nothing to translate
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift))
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n), device=x.device)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
