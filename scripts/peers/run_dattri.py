"""One measured call of dattri 0.3.0 (run in dattri's own virtual environment; see harness.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dattri_api  # noqa: E402
import harness  # noqa: E402

if __name__ == "__main__":
    sys.exit(harness.run_job(lambda job, ctx: dattri_api.build(job, ctx, "dattri")))
