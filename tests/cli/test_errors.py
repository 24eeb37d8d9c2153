"""Walk the error catalogue: one actionable line, non-zero exit, no traceback, no output."""

from __future__ import annotations

import pytest

from dattri_cli import cli
from tests.cli.error_catalogue import CATALOGUE


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.name for c in CATALOGUE])
def test_bad_input(case, tmp_path, monkeypatch, capsys, cache_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATTRI_CACHE_DIR", str(cache_dir))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    if case.setup:
        case.setup(tmp_path)
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    args = [a.replace("{tmp}", str(tmp_path)) for a in case.args]
    if args[0] == "run" and not any(a.startswith("out=") for a in args):
        args.append(f"out={tmp_path}/scores.safetensors")
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    err = capsys.readouterr().err
    assert info.value.code not in (0, None)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert case.expect in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "pwned").exists(), "a file's pickled code ran"
    after = {p for p in tmp_path.rglob("*") if p.is_file() and p.suffix == ".safetensors"}
    assert after <= before, f"output written: {after - before}"


def test_catalogue_is_large_and_distinct():
    assert len(CATALOGUE) >= 20
    assert len({c.name for c in CATALOGUE}) == len(CATALOGUE)


def test_troubleshooting_page_matches_catalogue():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "gen_troubleshooting.py"
    proc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_interrupt_leaves_no_file_and_says_so(tmp_path, monkeypatch, capsys, cache_dir):
    from dattri_cli import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "run", interrupted)
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "progress=off", f"out={tmp_path}/s.safetensors", f"cache_dir={cache_dir}"])
    assert info.value.code == 130
    assert "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "s.safetensors").exists()


def test_shuffled_loader_is_refused_in_python_api():
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from dattri_cli.algorithm.tracin import TracInAttributor
    from dattri_cli.errors import ConfigError
    from dattri_cli.task import AttributionTask

    model = torch.nn.Linear(2, 2)
    task = AttributionTask(
        lambda p, b: torch.func.functional_call(model, p, (b[0],)).sum(), model, model.state_dict()
    )
    data = TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError, match="shuffle=False"):
        TracInAttributor(task, [1.0], False).attribute(DataLoader(data, shuffle=True), DataLoader(data))
