"""Task distributions: sinusoid and harmonic regression, Omniglot N-way K-shot classification.

Every source samples a whole meta-batch at once as a `TaskBatch` of stacked tensors, from a
`torch.Generator` it is handed (so the same seed gives the same tasks, and resuming restores the
generator's state). Sampling works with tensor indexing on the data's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TaskBatch:
    """`B` tasks: support `(B, S, *x)`, `(B, S, *y)` and query `(B, Q, *x)`, `(B, Q, *y)`."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def task(self, i: int) -> TaskBatch:
        """Task `i` alone, keeping the leading batch dimension of size 1."""
        return TaskBatch(*(t[i : i + 1] for t in self.tensors()))

    def chunk(self, start: int, stop: int) -> TaskBatch:
        return TaskBatch(*(t[start:stop] for t in self.tensors()))

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.support_x, self.support_y, self.query_x, self.query_y

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TaskBatch:
        """Move to `device`; `dtype` converts the floating tensors (inputs, regression targets)."""

        def move(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device)

        return TaskBatch(*(move(t) for t in self.tensors()))
