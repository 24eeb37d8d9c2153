"""Models, data and loss functions shared by every side of ``scripts/bench_big.py``.

This module imports only torch (and transformers for the BERT-style model), never
``dattri_cli`` nor a peer library, so the peer runners in this folder can import it from
their own virtual environments. Every side rebuilds the architecture from the same
``spec.json`` and loads the same safetensors state dicts and data tensors.

* ``resnet18``: the torchvision ResNet-18 layout (7x7 stride-2 stem, max-pool, four stages
  of two BasicBlocks, 64-128-256-512 channels, 10 classes; 11,181,642 parameters at
  ``width=64``), written here because torchvision cannot be installed next to the CPU
  torch; BatchNorm is kept in eval mode so samples never interact.
* ``bert``: ``BertForSequenceClassification`` from a ``BertConfig`` (random init, eager
  attention), wrapped so that ``model(input_ids)`` returns the logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy

# ----------------------------------------------------------------------------------------- ResNet-18


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(out + skip)


class ResNet18(nn.Module):
    """torchvision's ``resnet18`` layout and parameter names; ``width`` scales the channels."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths = [width, 2 * width, 4 * width, 8 * width]
        cin = width
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w, 1)))
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ----------------------------------------------------------------------------------------- BERT


class BertClassifier(nn.Module):
    """``model(input_ids) -> logits`` around ``BertForSequenceClassification`` (no padding: mask all ones)."""

    def __init__(self, spec: Dict[str, Any]) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification  # noqa: PLC0415

        config = BertConfig(
            vocab_size=spec["vocab_size"],
            hidden_size=spec["hidden"],
            num_hidden_layers=spec["layers"],
            num_attention_heads=spec["heads"],
            intermediate_size=4 * spec["hidden"],
            max_position_embeddings=spec["seq_len"],
            num_labels=spec["num_classes"],
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        config._attn_implementation = "eager"
        self.bert = BertForSequenceClassification(config)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.bert(input_ids=input_ids).logits


# ----------------------------------------------------------------------------------------- specs


def default_spec(model: str, smoke: bool = False) -> Dict[str, Any]:
    """The architecture and data shape of ``model`` (``smoke``: a tiny version for tests)."""
    if model == "resnet18":
        return {"model": "resnet18", "width": 4 if smoke else 64, "num_classes": 10, "image": [3, 32, 32]}
    if model == "bert":
        return {
            "model": "bert",
            "vocab_size": 500 if smoke else 30522,
            "hidden": 16 if smoke else 256,
            "layers": 1 if smoke else 4,
            "heads": 2 if smoke else 4,
            "seq_len": 16 if smoke else 128,
            "num_classes": 2,
        }
    msg = f"unknown model {model!r}"
    raise ValueError(msg)


def build_model(spec: Dict[str, Any]) -> nn.Module:
    if spec["model"] == "resnet18":
        model = ResNet18(num_classes=spec["num_classes"], width=spec["width"])
    else:
        model = BertClassifier(spec)
    return model.eval()


def make_data(spec: Dict[str, Any], n_train: int, n_test: int, seed: int = 0) -> Dict[str, Tensor]:
    """Synthetic, learnable data: images around a per-class pattern; token sequences whose label is
    which half of the vocabulary most of their tokens come from."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    k = spec["num_classes"]
    y = torch.randint(0, k, (n,), generator=g)
    if spec["model"] == "resnet18":
        prototypes = torch.randn(k, *spec["image"], generator=g)
        x = 0.5 * prototypes[y] + torch.randn(n, *spec["image"], generator=g)
    else:
        half = spec["vocab_size"] // 2
        rand = torch.randint(0, half, (n, spec["seq_len"]), generator=g)
        biased = torch.rand(n, spec["seq_len"], generator=g) < 0.7
        x = rand + half * (biased == y.bool()[:, None]).long()
    return {"x_train": x[:n_train], "y_train": y[:n_train], "x_test": x[n_train:], "y_test": y[n_train:]}


def write_inputs(folder: Path, spec: Dict[str, Any], n_train: int, n_test: int, train_steps: int = 3) -> None:
    """Save ``spec.json``, ``data.safetensors`` and two checkpoints: the initialisation (seed 0)
    and the model after ``train_steps`` SGD steps on the training data (lr 0.01, eval mode)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    spec = dict(spec, n_train=n_train, n_test=n_test, lr=0.01)
    (folder / "spec.json").write_text(json.dumps(spec, indent=1))
    data = make_data(spec, n_train, n_test)
    save_file({k: v.contiguous() for k, v in data.items()}, str(folder / "data.safetensors"))
    torch.manual_seed(0)
    model = build_model(spec)
    states = [{k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}]
    opt = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=0.9)
    batch = min(64, n_train)
    for step in range(train_steps):
        i = (step * batch) % n_train
        x, y = data["x_train"][i : i + batch], data["y_train"][i : i + batch]
        opt.zero_grad()
        cross_entropy(model(x), y).backward()
        opt.step()
    states.append({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()})
    for i, state in enumerate(states):
        save_file(state, str(folder / f"ckpt{i}.safetensors"))


def load_inputs(folder: Path) -> Tuple[Dict[str, Any], nn.Module, Dict[str, Tensor], list]:
    """(spec, model in eval mode with the last checkpoint loaded, data tensors, [state dicts])."""
    from safetensors.torch import load_file  # noqa: PLC0415

    spec = json.loads((folder / "spec.json").read_text())
    data = load_file(str(folder / "data.safetensors"))
    ckpts = [load_file(str(folder / f"ckpt{i}.safetensors")) for i in range(2)]
    model = build_model(spec)
    model.load_state_dict(ckpts[-1])
    return spec, model, data, ckpts


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------- functions


def per_sample_functions(model: nn.Module) -> Dict[str, Any]:
    """``f(params, (x, y))`` on ONE sample without a batch dimension (TracIn / TRAK convention
    of dattri and dattri-cli): cross-entropy, and TRAK's margin ``log p / (1 - p)`` and ``p``."""
    from torch.func import functional_call  # noqa: PLC0415

    def logits(params: Dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, params, (x.unsqueeze(0),))

    def ce(params: Dict[str, Tensor], data: Tuple[Tensor, Tensor]) -> Tensor:
        x, y = data
        return cross_entropy(logits(params, x), y.long().unsqueeze(0))

    def margin(params: Dict[str, Tensor], data: Tuple[Tensor, Tensor]) -> Tensor:
        x, y = data
        logp = -cross_entropy(logits(params, x), y.long().unsqueeze(0))
        return logp - torch.log1p(-torch.exp(logp))

    def p_correct(params: Dict[str, Tensor], data: Tuple[Tensor, Tensor]) -> Tensor:
        x, y = data
        return torch.exp(-cross_entropy(logits(params, x), y.long().unsqueeze(0)))

    return {"ce": ce, "margin": margin, "p_correct": p_correct}


def batch_ce(model: nn.Module):  # noqa: ANN201 - a closure
    """``f(params, (x, y))`` on a batch: mean cross-entropy (the influence-function convention)."""
    from torch.func import functional_call  # noqa: PLC0415

    def ce(params: Dict[str, Tensor], data: Tuple[Tensor, Tensor]) -> Tensor:
        x, y = data
        return cross_entropy(functional_call(model, params, (x,)), y.long())

    return ce


def floor_pass(model: nn.Module, data: Dict[str, Tensor], batch: int, device: str = "cpu") -> None:
    """The floor: one plain batched forward + ``loss.backward()`` over train + test."""
    for side in ("train", "test"):
        x, y = data[f"x_{side}"], data[f"y_{side}"]
        for i in range(0, len(x), batch):
            model.zero_grad(set_to_none=True)
            cross_entropy(
                model(x[i : i + batch].to(device)), y[i : i + batch].to(device), reduction="sum"
            ).backward()
