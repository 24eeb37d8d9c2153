"""An example of your own model for dattri-cli: any nn.Module importable by dotted path."""

from torch import Tensor, nn


class TinyNet(nn.Module):
    """One hidden layer; `final_layer` names the last linear layer (used by RPS)."""

    final_layer = "out"

    def __init__(self, in_features: int, num_classes: int, hidden: int = 16) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_features, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(nn.functional.relu(self.hidden(x)))
