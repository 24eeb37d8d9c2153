"""The Hydra application behind ``dattri run``: compose the config, call the pipeline.

Thin on purpose: the work lives in :func:`dattri_cli.pipeline.run`, which tests
call directly. User errors become one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dattri_cli.errors import reported

log = logging.getLogger("dattri_cli")


def _log_warning(
    message: Warning | str,
    category: type,
    filename: str,
    lineno: int,
    file: object = None,
    line: object = None,
) -> None:  # noqa: ARG001
    """Show a Python warning as one log line (console and the run's log file), not file:line + source."""
    log.warning("%s", message)


@hydra.main(version_base="1.3", config_path="pkg://dattri_cli.configs", config_name="run")
def main(cfg: DictConfig) -> None:
    """Run one attribution job with the composed config."""
    from dattri_cli import distributed, pipeline, summary  # noqa: PLC0415 - keep `--help` fast

    hydra_cfg = HydraConfig.get()
    choices = {k: str(v) for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra")}
    # inside the Hydra job: Hydra would otherwise print its own multi-line report
    with reported(debug=os.environ.get("HYDRA_FULL_ERROR") == "1"), warnings.catch_warnings():
        warnings.showwarning = _log_warning  # restored when the block ends
        result = pipeline.run(cfg, output_dir=Path(hydra_cfg.runtime.output_dir), choices=choices)
    distributed.shutdown()
    if result.metadata:  # under torchrun only rank 0 writes (and reports) the result
        summary.print_summary(result)
