"""Batches of token windows: random ones for training, fixed ones for evaluation."""

from __future__ import annotations

import torch


def derived_seed(seed: int, index: int) -> int:
    """A seed for the ``index``-th stream (step, epoch, window) of a run seeded ``seed``:
    deterministic, so a resumed or re-evaluated run draws exactly the same numbers."""
    return seed * 1_000_003 + index


def train_batch(data: torch.Tensor, batch_size: int, seq_len: int, seed: int, step: int,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows for one step. The generator is derived from (seed, step), so a
    resumed run sees exactly the batches the uninterrupted run would have seen."""
    gen = torch.Generator().manual_seed(derived_seed(seed, step))
    starts = torch.randint(0, len(data) - seq_len - 1 + 1, (batch_size,), generator=gen)
    return windows_at(data, starts, seq_len, device)


def eval_batches(data: torch.Tensor, batch_size: int, seq_len: int, n_batches: int,
                 device: torch.device | str = "cpu"):
    """Fixed, evenly spaced windows over the whole split: the same every evaluation."""
    n_windows = max(1, min(n_batches * batch_size, (len(data) - 1) // seq_len))
    span = len(data) - seq_len - 1
    starts = torch.linspace(0, max(span, 0), n_windows).long()
    for chunk in starts.split(batch_size):
        yield windows_at(data, chunk, seq_len, device)


def windows_at(data: torch.Tensor, starts: torch.Tensor, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    chunk = data[idx].long()
    return chunk[:, :-1].to(device, non_blocking=True), chunk[:, 1:].to(device, non_blocking=True)
