"""`dattri show` and `dattri plot` on a real score file."""

from __future__ import annotations

import json

import pytest

from dattri_cli import cli, pipeline


@pytest.fixture
def score_file(small_run):
    return pipeline.run(small_run("attributor=if_explicit")).path


def test_show_json_reports_shape_stats_and_top_samples(score_file, capsys):
    cli.main(["show", str(score_file), "--test", "0,3", "--top-k", "4", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["shape"] == [60, 12]
    assert data["attributor"]["target"].endswith("IFAttributorExplicit")
    assert [t["column"] for t in data["tests"]] == [0, 3]
    test = data["tests"][1]
    assert len(test["proponents"]) == 4 and "label" in test
    scores = [p["score"] for p in test["proponents"]]
    assert scores == sorted(scores, reverse=True)
    assert test["proponents"][0]["score"] >= test["opponents"][0]["score"]
    assert data["stats"]["min"] <= data["stats"]["mean"] <= data["stats"]["max"]


def test_show_tables_print(score_file, capsys):
    cli.main(["show", str(score_file)])
    out = capsys.readouterr().out
    assert "proponent" in out and "(60, 12)" in out


def test_plot_writes_png(score_file, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "p.png"
    cli.main(["plot", str(score_file), "--test", "2", "--out", str(out), "--top-k", "3"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_list_json_matches_configs(capsys):
    cli.main(["list", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert {"grad_dot", "if_explicit", "trak"} <= set(data["attributor"])
    assert data["model"]["mlp"]["options"]["hidden"] == [128, 128]


def test_config_reference_is_current():
    from pathlib import Path

    from dattri_cli.catalog import catalog, render_markdown

    page = Path(__file__).resolve().parents[2] / "docs" / "configs.md"
    assert page.read_text() == render_markdown(catalog()), "run: dattri list --markdown > docs/configs.md"


def test_show_reads_a_shard_set_like_the_merged_file(small_run, tmp_path, capsys):
    shard_paths = [
        pipeline.run(
            small_run("attributor=grad_dot", f"shard.index={i}", "shard.count=2", out="sh.safetensors")
        ).path
        for i in range(2)
    ]
    full = pipeline.run(small_run("attributor=grad_dot", out="full.safetensors")).path
    summaries = []
    for source in (full, shard_paths[1], tmp_path):
        cli.main(["show", str(source), "--test", "1", "--json", "--no-labels"])
        summaries.append(json.loads(capsys.readouterr().out))
    for other in summaries[1:]:
        assert other["shape"] == summaries[0]["shape"]
        assert other["tests"] == summaries[0]["tests"]
        assert abs(other["stats"]["mean"] - summaries[0]["stats"]["mean"]) < 1e-9
    assert summaries[1]["shards"] == 2


@pytest.mark.parametrize("command", ["list", "show", "plot", "groundtruth", "eval", "compare", "merge"])
def test_every_command_has_help_with_examples(command, capsys):
    try:
        cli.main([command, "--help"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    assert "example" in capsys.readouterr().out
