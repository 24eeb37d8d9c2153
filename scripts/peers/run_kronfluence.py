"""One measured call of Kronfluence 1.0.1's EK-FAC (factors + pairwise scores).

Run in Kronfluence's own virtual environment (see harness.py and setup_peers.sh). Its task:
the summed cross-entropy over the batch as the training loss (labels sampled from the
model's predictions while fitting the factors, i.e. the true Fisher, as Kronfluence
recommends), the summed cross-entropy of the true labels as the measurement; every
``nn.Linear`` / ``nn.Conv2d`` tracked; damping from the settings (None: Kronfluence's
heuristic, 0.1 x the mean eigenvalue). Scores are returned as ``(n_train, n_test)``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict

import torch
from torch.nn.functional import cross_entropy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def build(job: Dict[str, Any], ctx: Dict[str, Any]) -> Callable[[], torch.Tensor]:
    s = job["settings"]
    if s.get("api") != "ekfac":
        msg = f"kronfluence is run for EK-FAC only, not {job['method']}"
        raise harness.Unsupported(msg)
    from kronfluence.analyzer import Analyzer, prepare_model  # noqa: PLC0415
    from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: PLC0415
    from kronfluence.task import Task  # noqa: PLC0415

    class ClassificationTask(Task):
        def compute_train_loss(
            self, batch: Any, model: torch.nn.Module, sample: bool = False
        ) -> torch.Tensor:
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), dim=-1), num_samples=1).flatten()
            return cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: torch.nn.Module) -> torch.Tensor:
            x, y = batch
            return cross_entropy(model(x), y, reduction="sum")

    device = job.get("device", "cpu")
    model = ctx["model"]
    out_dir = tempfile.mkdtemp(prefix="kronfluence_", dir=str(Path(job["out"]).parent))
    task = ClassificationTask()
    model = prepare_model(model, task)
    analyzer = Analyzer(
        analysis_name="bench",
        model=model,
        task=task,
        cpu=not str(device).startswith("cuda"),
        disable_tqdm=True,
        output_dir=out_dir,
    )
    factor_args = FactorArguments(strategy=s.get("strategy", "ekfac"))
    score_args = ScoreArguments(damping_factor=s.get("damping_factor"))
    ld = ctx["loaders"]

    def run() -> torch.Tensor:
        analyzer.fit_all_factors(
            factors_name="bench",
            dataset=ld["train_set"],
            per_device_batch_size=job["batch"],
            factor_args=factor_args,
            overwrite_output_dir=True,
        )
        analyzer.compute_pairwise_scores(
            scores_name="bench",
            factors_name="bench",
            query_dataset=ld["test_set"],
            train_dataset=ld["train_set"],
            per_device_query_batch_size=job["batch"],
            per_device_train_batch_size=job["batch"],
            score_args=score_args,
            overwrite_output_dir=True,
        )
        return analyzer.load_pairwise_scores("bench")["all_modules"].T

    return run


if __name__ == "__main__":
    sys.exit(harness.run_job(build))
