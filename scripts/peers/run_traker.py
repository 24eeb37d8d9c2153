"""One measured call of TRAK's own library, ``traker`` 0.3.2, with its CPU ``BasicProjector``.

Run in traker's own virtual environment (see harness.py and setup_peers.sh). The model
output is TRAK's margin ``log p / (1 - p)`` of the correct class (its
``ImageClassificationModelOutput``, which only needs ``model(x)`` to return logits, so it
serves the BERT-style classifier too), features in float32, no ridge: the same functions
and kernel as the dattri API's ``TRAKAttributor`` in ``dattri_api.py``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def build(job: Dict[str, Any], ctx: Dict[str, Any]) -> Callable[[], torch.Tensor]:
    s = job["settings"]
    if s.get("api") != "trak":
        msg = f"traker offers TRAK only, not {job['method']}"
        raise harness.Unsupported(msg)
    from trak import TRAKer  # noqa: PLC0415
    from trak.projectors import BasicProjector, ProjectionType  # noqa: PLC0415

    model, device, ld = ctx["model"], job.get("device", "cpu"), ctx["loaders"]
    ckpt = {k: v.to(device) for k, v in ctx["ckpts"][-1].items()}
    n_train, n_test = len(ctx["data"]["x_train"]), len(ctx["data"]["x_test"])
    grad_dim = sum(p.numel() for p in model.parameters())
    save_dir = tempfile.mkdtemp(prefix="traker_", dir=str(Path(job["out"]).parent))

    block_size = s.get("block_size", 100)  # traker's default
    if s["proj_dim"] <= block_size:
        # traker 0.3.2 frees a one-block projection matrix after featurizing and then scores with
        # it (AttributeError 'proj_matrix'); two blocks regenerate it. Only tiny (smoke) runs hit this.
        block_size = max(1, (s["proj_dim"] + 1) // 2)

    def run() -> torch.Tensor:
        projector = BasicProjector(
            grad_dim=grad_dim,
            proj_dim=s["proj_dim"],
            seed=s.get("seed", 0),
            proj_type=ProjectionType(s.get("proj_type", "normal")),
            device=device,
            block_size=block_size,
        )
        traker = TRAKer(
            model=model,
            task="image_classification",
            train_set_size=n_train,
            save_dir=save_dir,
            load_from_save_dir=True,  # a fresh folder; False skips creating experiments.json
            device=device,
            projector=projector,
            proj_dim=s["proj_dim"],
            use_half_precision=False,
            logging_level=40,
        )
        traker.load_checkpoint(ckpt, model_id=0)
        for x, y in ld["train"]:
            traker.featurize(batch=(x.to(device), y.to(device)), num_samples=len(x))
        traker.finalize_features()
        traker.start_scoring_checkpoint(exp_name="bench", checkpoint=ckpt, model_id=0, num_targets=n_test)
        for x, y in ld["test"]:
            traker.score(batch=(x.to(device), y.to(device)), num_samples=len(x))
        return torch.as_tensor(traker.finalize_scores(exp_name="bench"))

    return run


if __name__ == "__main__":
    sys.exit(harness.run_job(build))
