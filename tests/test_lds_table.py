"""scripts/lds_table.py --smoke: a table row per (model, attributor), failures noted, JSON written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("lds_table", REPO / "scripts" / "lds_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_table(tmp_path, capsys):
    rows = _script().main(["--smoke", "--models", "lr", "--out-dir", str(tmp_path)])
    by_name = {r["attributor"]: r for r in rows}
    assert set(by_name) == {"grad_dot", "if_explicit", "trak"}
    assert -1.0 <= by_name["if_explicit"]["lds"] <= 1.0
    assert -1.0 <= by_name["trak"]["lds"] <= 1.0  # 512 dims > 40 samples: the default ridge keeps it solvable
    saved = json.loads((tmp_path / "lds_table.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert "LDS on digits" in capsys.readouterr().out


def test_attributor_list_comes_from_the_configs():
    names = _script().available_attributors()
    assert {"grad_dot", "if_explicit"} <= set(names)
