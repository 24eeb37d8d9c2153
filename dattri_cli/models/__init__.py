"""Built-in models. Each takes flat inputs ``(batch, in_features)``.

``in_features`` and ``num_classes`` may be left ``None`` in a config: the runner
fills them from the dataset. ``FINAL_LAYER`` names the last linear layer (used by
representer point selection).
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: one linear layer on the inputs."""

    final_layer = "linear"

    def __init__(self, in_features: int, num_classes: int) -> None:
        """A linear map from ``in_features`` to ``num_classes`` logits."""
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch of flat inputs."""
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """A ReLU multilayer perceptron with the given hidden widths."""

    final_layer = "head"

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (128, 128)) -> None:
        """Hidden layers ``hidden`` (e.g. [128, 128]) then a linear head."""
        super().__init__()
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch of flat inputs."""
        return self.head(self.body(x.flatten(1)))


class SmallCNN(nn.Module):
    """A two-convolution network for square single-channel images (8x8 digits)."""

    final_layer = "head"

    def __init__(
        self, in_features: int, num_classes: int, channels: int = 8, image_size: Optional[int] = None
    ) -> None:
        """Reshapes flat inputs to ``(1, side, side)``; ``side`` defaults to sqrt(in_features)."""
        super().__init__()
        side = image_size or round(in_features**0.5)
        if side * side != in_features:
            msg = f"SmallCNN needs square images: in_features={in_features} is not a square number"
            raise ValueError(msg)
        self.side = side
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(channels * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch of flat (or image-shaped) inputs."""
        return self.head(self.features(x.reshape(-1, 1, self.side, self.side)))
