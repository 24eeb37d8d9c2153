"""Built-in models. Each takes flat inputs ``(batch, in_features)`` (the CNN also image-shaped ones).

``in_features`` and ``num_classes`` may be left ``None`` in a config: the runner
fills them from the dataset. ``FINAL_LAYER`` names the last linear layer (used by
representer point selection).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

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
    """A two-convolution network for images of any size and channel count (8x8 digits by default).

    Adaptive average pooling to 2x2 before the head makes the parameter shapes depend
    only on ``in_channels``, ``channels`` and ``num_classes``, never on the image size,
    so the default construction (one channel, square side from ``in_features``) is
    unchanged: same parameter names, shapes and initialisation as before.
    """

    final_layer = "head"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        channels: int = 8,
        image_size: Optional[Union[int, Sequence[int]]] = None,
        in_channels: int = 1,
    ) -> None:
        """Reshapes inputs (flat or image-shaped) to ``(in_channels, height, width)``.

        ``image_size`` is a side (square) or ``[height, width]``; ``None`` means square
        with side ``sqrt(in_features / in_channels)``. ``in_features`` must equal
        ``in_channels * height * width``.
        """
        super().__init__()
        if in_channels < 1 or in_features % in_channels:
            msg = f"SmallCNN: in_features={in_features} is not a multiple of in_channels={in_channels}"
            raise ValueError(msg)
        pixels = in_features // in_channels
        if image_size is None:
            side = round(pixels**0.5)
            if side * side != pixels:
                msg = (
                    f"SmallCNN needs square images: in_features={in_features} is not a square number"
                    if in_channels == 1
                    else f"SmallCNN: {pixels} pixels per channel is not a square; give image_size=[height, width]"
                )
                raise ValueError(msg)
            height = width = side
        elif isinstance(image_size, int):
            height = width = image_size
        else:
            height, width = (int(v) for v in image_size)
        if in_channels * height * width != in_features:
            msg = (
                f"SmallCNN: in_features={in_features} but in_channels x height x width = {in_channels}"
                f" x {height} x {width}"
            )
            raise ValueError(msg)
        self.in_channels, self.height, self.width = in_channels, height, width
        self.side = height if height == width else None  # kept for code reading the square side
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(channels * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch of flat (or image-shaped) inputs."""
        return self.head(self.features(x.reshape(-1, self.in_channels, self.height, self.width)))
