"""The input embeddings of the small text students (bilstm, textcnn), started from the teacher's."""

import torch
from torch import nn

from distill.errors import UserError


def embedding_from_teacher(vocab_size: int, dim: int, pad_id: int, teacher: torch.Tensor | None) -> nn.Embedding:
    """nn.Embedding(vocab_size, dim, padding_idx=pad_id), started from the teacher's [V, D_t] input embeddings if given.

    D_t == dim: an exact copy (the pad row included; padding_idx keeps it frozen and both models mask pad positions).
    Otherwise the centred teacher rows are projected onto its top-`dim` principal axes, found exactly from the
    D_t x D_t scatter matrix in float64 (eigh: deterministic, ~1 s for 30522 x 768, where an SVD of the whole matrix
    takes ~6 s). By Eckart-Young this keeps the teacher's pairwise inner products (centred Gram matrix) best in the
    least-squares sense of any `dim`-wide embedding. Each axis's sign is fixed (largest entry positive), and one scalar
    then rescales the rows so their std equals the teacher's. When dim exceeds the axes available (min(V, D_t)), the
    extra columns get small random values (normal, std 1% of the teacher's): near zero, but not all-equal dead columns.
    """
    embedding = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
    if teacher is None:
        return embedding
    if teacher.ndim != 2 or teacher.shape[0] != vocab_size:
        raise UserError(
            f"teacher embeddings have shape {tuple(teacher.shape)} but the student's vocab_size is {vocab_size}; "
            "pass vocab_size = the teacher's embedding rows (may exceed len(tokenizer)) "
            "or set model.init_embeddings: false"
        )
    with torch.no_grad():
        if teacher.shape[1] == dim:
            embedding.weight.copy_(teacher)
            return embedding
        rows = teacher.detach().to("cpu", torch.float64)
        centred = rows - rows.mean(0)
        _, axes = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues: flip to take the largest first
        axes = axes.flip(1)[:, : min(dim, *rows.shape)]
        axes = axes * torch.sign(axes.gather(0, axes.abs().argmax(0, keepdim=True)))
        projected = centred @ axes
        std = rows.std()
        projected = projected * (std / projected.std())
        extra = torch.randn(vocab_size, dim - projected.shape[1], dtype=torch.float64) * (0.01 * std)
        embedding.weight.copy_(torch.cat([projected, extra], dim=1))
    return embedding
