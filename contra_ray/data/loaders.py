"""Batch loaders: an epoch's sample indices in, ``(x, y)`` batches out (in-memory tensors or a streamed view;
the FFCV loader, :class:`contra_ray.data.ffcv_beton.FFCVBatchLoader`, plugs in at the same seam).
"""

from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

import torch


@runtime_checkable
class BatchLoader(Protocol):
    """Turns an epoch's sample indices into training batches (the seam for faster loaders, e.g. FFCV)."""

    def __len__(self) -> int:
        """N, the number of training samples the indices refer to."""
        ...

    def batches(self, indices: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x float32 [B, C, H, W], y int64 [B])`` on the training device, visiting ``indices``
        (int64 ``[n]``) in order; the last batch may be smaller."""
        ...


class TensorBatchLoader:
    """:class:`BatchLoader` over in-memory tensors, moved to ``device`` once.

    Args:
        x: float32 ``[N, C, H, W]`` preprocessed images; y: int64 ``[N]`` labels.
        batch_size: samples per batch (last batch of an epoch may be smaller, as MTT's ``DataLoader``).
        device: training device.

    Raises:
        ValueError: ``x`` and ``y`` lengths differ, or ``batch_size < 1``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: str | torch.device = "cpu"):
        if len(x) != len(y):
            raise ValueError(f"train images and labels differ in length: {len(x)} vs {len(y)}")
        if batch_size < 1:
            raise ValueError(f"experts.batch_size={batch_size}: must be >= 1")
        self.x, self.y = x.to(device), y.to(device=device, dtype=torch.long)
        self.batch_size = int(batch_size)

    def __len__(self) -> int:
        """N, the number of training samples."""
        return len(self.x)

    def batches(self, indices: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = indices.to(self.x.device)
        for chunk in indices.split(self.batch_size):
            yield self.x[chunk], self.y[chunk]


class StreamingBatchLoader:
    """:class:`BatchLoader` over a lazy image view that reads each batch when it is needed.

    Nothing but one batch is in memory: ``x[chunk]`` reads and preprocesses those rows (e.g. a
    :class:`contra_ray.data.PreprocessedImages` over an on-disk uint8 cache), then the batch moves to
    ``device``. Same batches, in the same order, as :class:`TensorBatchLoader` over the materialized
    tensor.

    Args:
        x: indexable ``x[int64 tensor] -> float32 [b, C, H, W]`` with ``len(x) = N``; y: int64 ``[N]``.
        batch_size: samples per batch; device: training device.

    Raises:
        ValueError: ``x`` and ``y`` lengths differ, or ``batch_size < 1``.
    """

    def __init__(self, x, y: torch.Tensor, batch_size: int, device: str | torch.device = "cpu"):
        if len(x) != len(y):
            raise ValueError(f"train images and labels differ in length: {len(x)} vs {len(y)}")
        if batch_size < 1:
            raise ValueError(f"experts.batch_size={batch_size}: must be >= 1")
        self.x, self.y = x, torch.as_tensor(y).long().cpu()
        self.batch_size, self.device = int(batch_size), torch.device(device)

    def __len__(self) -> int:
        """N, the number of training samples."""
        return len(self.x)

    def batches(self, indices: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for chunk in indices.cpu().split(self.batch_size):
            yield self.x[chunk].to(self.device), self.y[chunk].to(self.device)
