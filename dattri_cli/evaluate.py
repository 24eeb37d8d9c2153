"""``dattri eval scores=PATH groundtruth=PATH``: how well scores predict retraining.

Reports the LDS (with a bootstrap interval over test samples), the leave-one-out
correlation when the ground truth has LOO retrainings, and the mislabel-detection
AUC when it records flipped labels. Files that do not belong together (other
samples, or a different dataset / model / training recipe) are refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import Tensor

from dattri_cli import metric
from dattri_cli.errors import ConfigError, DattriError
from dattri_cli.groundtruth import RUN_ONLY_TRAIN_KEYS, groundtruth_key, load_groundtruth
from dattri_cli.io import load_score_set

log = logging.getLogger("dattri_cli")

ARG_KEYS = ("scores", "groundtruth", "out", "bootstrap", "level", "seed")


def check_compatible(
    scores_path: Path,
    gt_path: Path,
    st: Mapping[str, Tensor],
    sm: Mapping[str, Any],
    gt: Mapping[str, Tensor],
    gm: Mapping[str, Any],
) -> None:
    """Refuse a score file and a ground truth that describe different samples or models."""
    for key in ("train_indices", "test_indices"):
        if not torch.equal(st[key], gt[key]):
            msg = (
                f"{scores_path} and {gt_path} do not belong together: their {key.replace('_', ' ')} differ; "
                "make the ground truth with the same dataset overrides as the run"
            )
            raise DattriError(msg)
    config = sm.get("config", {})
    try:
        key = groundtruth_key(config)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        msg = (
            f"{scores_path} records no usable run config (dataset, model, train); score it with a "
            "file written by `dattri run`"
        )
        raise DattriError(msg) from exc
    if key != gm.get("groundtruth_key"):
        differ = [
            g
            for g in ("dataset", "model", "train")
            if _strip(g, config.get(g)) != _strip(g, gm["config"].get(g))
        ]
        msg = (
            f"{scores_path} and {gt_path} do not belong together: their "
            f"{', '.join(differ) or 'configs'} config differs "
            "(config hash mismatch); make the ground truth with the same overrides as the run"
        )
        raise DattriError(msg)


def _strip(group: str, node: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    if node is None or group != "train":
        return dict(node) if node is not None else None
    return {k: v for k, v in node.items() if k not in RUN_ONLY_TRAIN_KEYS}


def evaluate(
    scores_path: Path, gt_path: Path, bootstrap: int = 1000, level: float = 0.95, seed: int = 0
) -> Dict[str, Any]:
    """Every metric the two files allow, as a JSON-ready dictionary."""
    st, sm = load_score_set(scores_path)
    gt, gm = load_groundtruth(gt_path)
    check_compatible(scores_path, gt_path, st, sm, gt, gm)
    scores = st["scores"]
    report: Dict[str, Any] = {
        "scores": str(scores_path),
        "groundtruth": str(gt_path),
        "attributor": sm.get("attributor", {}).get("target"),
        "n_train": int(scores.shape[0]),
        "n_test": int(scores.shape[1]),
        "lds": None,
        "loo": None,
        "mislabel_auc": None,
    }
    if gt["targets"].shape[0] >= 2:
        res = metric.lds(scores, gt["subsets"], gt["targets"], bootstrap=bootstrap, level=level, seed=seed)
        report["lds"] = {
            "mean": res.mean,
            "ci_low": res.ci_low,
            "ci_high": res.ci_high,
            "level": level,
            "n_subsets": int(gt["targets"].shape[0]),
            "n_test_used": res.n_valid,
        }
        dropped = report["n_test"] - res.n_valid
        if dropped:
            flat_targets = int((gt["targets"].double().std(dim=0) == 0).sum())
            reasons = f"{flat_targets} with the same retrained loss on every subset" if flat_targets else ""
            if dropped - flat_targets > 0:
                reasons += (
                    "; " if reasons else ""
                ) + f"{dropped - flat_targets} whose predicted scores do not vary over subsets (no ranking)"
            report["lds"]["n_test_dropped"] = dropped
            report["lds"]["dropped_because"] = reasons
            log.warning(
                "LDS over %d of %d test samples: %d left out, %s",
                res.n_valid,
                report["n_test"],
                dropped,
                reasons,
            )
    if "loo_targets" in gt and gt["loo_indices"].numel() >= 2:
        value = metric.loo_correlation(scores, gt["loo_indices"], gt["loo_targets"], gt["full_targets"])
        report["loo"] = {"mean_pearson": value, "n_removed": int(gt["loo_indices"].numel())}
    if "flipped" in gt:
        report["mislabel_auc"] = _mislabel(gt["flipped"], scores, st.get("self_influence"))
    return report


def _mislabel(flipped: Tensor, scores: Tensor, self_influence: Optional[Tensor]) -> Dict[str, Any]:
    """AUC of finding the flipped labels, by harm to the test set and (if saved) self-influence."""
    out: Dict[str, Any] = {
        "n_flipped": int(flipped.sum()),
        "by_harm": metric.mislabel_auc(flipped, metric.harm_signal(scores)),
    }
    if self_influence is not None:
        out["by_self_influence"] = metric.mislabel_auc(flipped, self_influence)
    return out


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def print_report(report: Dict[str, Any]) -> None:
    """A rich table of the report."""
    from rich.table import Table  # noqa: PLC0415

    from dattri_cli.console import make_console  # noqa: PLC0415

    table = Table(title=f"{Path(report['scores']).name} vs {Path(report['groundtruth']).name}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("detail")
    lds = report["lds"]
    if lds:
        ci = (
            f"{lds['level']:.0%} CI [{lds['ci_low']:.4f}, {lds['ci_high']:.4f}], {lds['n_subsets']} "
            f"subsets, {lds['n_test_used']} test samples"
        )
        table.add_row("LDS (mean Spearman)", _fmt(lds["mean"]), ci)
    if report["loo"]:
        table.add_row(
            "LOO (mean Pearson)",
            _fmt(report["loo"]["mean_pearson"]),
            f"{report['loo']['n_removed']} samples removed",
        )
    auc = report["mislabel_auc"]
    if auc:
        table.add_row(
            "mislabel AUC (harm)",
            _fmt(auc["by_harm"]),
            f"{auc['n_flipped']} flipped labels; rank by minus mean score",
        )
        if "by_self_influence" in auc:
            table.add_row(
                "mislabel AUC (self-influence)", _fmt(auc["by_self_influence"]), "rank by self-influence"
            )
    make_console().print(table)


def parse_args(args: List[str]) -> Dict[str, Any]:
    """``KEY=VALUE`` arguments plus ``--json``; refuses unknown keys and bad values (one schema check)."""
    from dattri_cli.schema import EVAL_SETTINGS, closest, validate_settings, yaml_value  # noqa: PLC0415

    values: Dict[str, Any] = {"json": False}
    for arg in args:
        if arg == "--json":
            values["json"] = True
            continue
        key, sep, value = arg.partition("=")
        if not sep or key not in ARG_KEYS:
            best = closest(key, ARG_KEYS) if sep else None
            hint = f" (did you mean {best}?)" if best else ""
            msg = (
                f"unknown argument {arg!r}{hint}; usage: dattri eval scores=PATH groundtruth=PATH "
                "[--json] [out=PATH] [bootstrap=N] [level=0.95] [seed=N]"
            )
            raise ConfigError(msg)
        values[key] = value if key in {"scores", "groundtruth", "out"} else yaml_value(value)
    missing = [k for k in ("scores", "groundtruth") if k not in values]
    if missing:
        msg = f"missing {' and '.join(k + '=PATH' for k in missing)}; usage: dattri eval scores=PATH groundtruth=PATH"
        raise ConfigError(msg)
    return dict(validate_settings("eval", values, EVAL_SETTINGS))


HELP = """usage: dattri eval scores=PATH groundtruth=PATH [--json] [out=PATH] [bootstrap=N] [level=0.95] [seed=N]

How well a score file predicts retraining: LDS (mean Spearman over test samples, with a
bootstrap confidence interval), LOO correlation (mean Pearson) when the ground truth has
leave-one-out retrainings, and mislabel-detection AUC when labels were flipped.
Refuses files whose train/test indices or configs do not belong together. scores= may
also name row-block shards (their folder, a quoted glob or one shard file): they are
assembled in memory, like `dattri merge` would.

examples:
  dattri groundtruth model=lr num_subsets=50 out=gt.safetensors
  dattri run attributor=if_explicit model=lr out=if.safetensors
  dattri eval scores=if.safetensors groundtruth=gt.safetensors
  dattri eval scores=if.safetensors groundtruth=gt.safetensors --json out=report.json
"""


def main(args: List[str]) -> int:
    """Evaluate, print a table (or JSON with ``--json``), write JSON to ``out=`` if given."""
    if any(a in {"-h", "--help"} for a in args):
        print(HELP)
        return 0
    opts = parse_args(args)
    report = evaluate(
        Path(opts["scores"]),
        Path(opts["groundtruth"]),
        int(opts.get("bootstrap", 1000)),
        float(opts.get("level", 0.95)),
        int(opts.get("seed", 0)),
    )
    text = json.dumps(report, indent=2, sort_keys=True)
    if opts.get("out"):
        Path(opts["out"]).expanduser().write_text(text + "\n")
    if opts["json"]:
        print(text)
    else:
        print_report(report)
    return 0
