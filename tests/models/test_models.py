"""Built-in models: SmallCNN on any image size and channel count, unchanged for 8x8 digits."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import grad, vmap

from dattri_cli.func.batch import SAMPLE_IN_DIMS
from dattri_cli.models import SmallCNN
from dattri_cli.tasks import classification


def test_default_cnn_is_built_exactly_as_before() -> None:
    """Same layers created in the same order from the same seed: existing checkpoints and score files still fit."""
    torch.manual_seed(0)
    model = SmallCNN(64, 10)
    torch.manual_seed(0)
    reference = nn.ModuleDict(
        {
            "features": nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(8, 8, 3, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(2),
                nn.Flatten(),
            ),
            "head": nn.Linear(32, 10),
        }
    )
    expected = reference.state_dict()
    assert list(model.state_dict()) == list(expected)
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    x = torch.randn(3, 64)
    torch.testing.assert_close(
        model(x), reference["head"](reference["features"](x.reshape(3, 1, 8, 8))), rtol=0, atol=0
    )
    assert model.side == 8


def test_rgb_non_square_images_flat_or_shaped_and_per_sample_gradients() -> None:
    torch.manual_seed(1)
    model = SmallCNN(3 * 12 * 20, 4, channels=5, image_size=[12, 20], in_channels=3)
    images = torch.randn(6, 3, 12, 20)
    logits = model(images)
    assert logits.shape == (6, 4)
    torch.testing.assert_close(model(images.flatten(1)), logits)
    assert model.features[0].weight.shape == (5, 3, 3, 3) and model.head.weight.shape == (4, 20)
    # another image size changes no parameter shape
    assert {
        k: v.shape for k, v in SmallCNN(3 * 32 * 32, 4, channels=5, in_channels=3).state_dict().items()
    } == {k: v.shape for k, v in model.state_dict().items()}
    params = {k: v.detach() for k, v in model.named_parameters()}
    labels = torch.randint(0, 4, (6,))
    grads = vmap(grad(classification(model, sample_ndim=3).loss_func), in_dims=SAMPLE_IN_DIMS)(
        params, (images, labels)
    )
    model.zero_grad()
    nn.functional.cross_entropy(model(images[2:3]), labels[2:3]).backward()
    torch.testing.assert_close(grads["features.0.weight"][2], model.features[0].weight.grad)


def test_shapes_that_do_not_fit_are_refused() -> None:
    with pytest.raises(ValueError, match="needs square images: in_features=60"):
        SmallCNN(60, 3)
    with pytest.raises(ValueError, match="not a multiple of in_channels=3"):
        SmallCNN(64, 3, in_channels=3)
    with pytest.raises(ValueError, match="give image_size"):
        SmallCNN(3 * 6 * 8, 3, in_channels=3)
    with pytest.raises(ValueError, match=r"in_channels x height x width = 1 x 5 x 5"):
        SmallCNN(64, 3, image_size=5)
