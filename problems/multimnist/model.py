"""The LeNet-style multi-task network of Sener & Koltun's Multi-MNIST experiments (MGDA-UB).

Shared encoder (the ``MultiLeNet`` representation of the MGDA-UB code):
``conv 5×5 (1→10) → max-pool 2 → ReLU → conv 5×5 (10→20) → max-pool 2 → ReLU → flatten →
linear (20·s²→50) → ReLU``, with ``s = ((image_size − 4)/2 − 4)/2`` (4 at 28 px, 320 inputs to
the linear layer). One head per task: ``linear (50→50) → ReLU → linear (50→10)`` giving logits.
The original code's dropout layers are left out, so a step depends only on the data order.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["MultiLeNet"]


class MultiLeNet(nn.Module):
    """Shared LeNet encoder and ``n_tasks`` classification heads of ``n_classes`` logits."""

    def __init__(self, n_tasks: int = 2, n_classes: int = 10, image_size: int = 28,
                 width: int = 50) -> None:
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for two 5x5 convolutions and pools")
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 10, kernel_size=5), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(10, 20, kernel_size=5), nn.MaxPool2d(2), nn.ReLU(),
            nn.Flatten(), nn.Linear(20 * side * side, width), nn.ReLU(),
        )
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, n_classes))
            for _ in range(n_tasks)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``(z, [logits_1, ..., logits_K])``: the shared representation and each head's logits."""
        z = self.encoder(x)
        return z, [head(z) for head in self.heads]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def task_parameters(self) -> list[list[nn.Parameter]]:
        return [list(h.parameters()) for h in self.heads]
