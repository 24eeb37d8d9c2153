"""Write an example dataset (data.npz with x, y) and a trained checkpoint for TinyNet.

Stands in for your own files: run it once, then point `dattri run` at them
(see README.md, "Bring your own model and data").
"""

from pathlib import Path

import numpy as np
import torch
from my_model import TinyNet
from safetensors.torch import save_file

here = Path(__file__).parent
gen = torch.Generator().manual_seed(0)
x = torch.randn(300, 10, generator=gen)
y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
np.savez(here / "data.npz", x=x.numpy(), y=y.numpy())

torch.manual_seed(0)
model = TinyNet(10, 3)
opt = torch.optim.Adam(model.parameters(), lr=0.05)
for _ in range(200):
    opt.zero_grad()
    nn_loss = torch.nn.functional.cross_entropy(model(x), y)
    nn_loss.backward()
    opt.step()
save_file(model.state_dict(), str(here / "tiny.safetensors"))
print(f"wrote {here / 'data.npz'} and {here / 'tiny.safetensors'} (train loss {nn_loss.item():.3f})")
