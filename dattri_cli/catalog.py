"""``dattri list``: the config groups and their options, read from the packaged YAML.

Reading the shipped configs (rather than a hand-kept table) keeps the list true.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Dict

import yaml

GROUPS = ("attributor", "dataset", "model", "train")


def _first_comment(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def catalog() -> Dict[str, Dict[str, Any]]:
    """``{group: {option: {"about": str, "options": {key: default}}}}``."""
    root = resources.files("dattri_cli.configs")
    out: Dict[str, Dict[str, Any]] = {}
    for group in GROUPS:
        entries = {}
        for item in sorted(root.joinpath(group).iterdir(), key=lambda p: p.name):
            if not item.name.endswith(".yaml"):
                continue
            text = item.read_text()
            data = yaml.safe_load(text) or {}
            options = {k: v for k, v in data.items() if not k.startswith("_") and k not in {"defaults", "runner"}}
            entries[item.name[:-5]] = {"about": _first_comment(text), "target": data.get("_target_"), "options": options}
        out[group] = entries
    return out


def print_catalog(as_json: bool = False) -> None:
    """Print the catalogue as rich tables, or JSON for machines."""
    data = catalog()
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    console = Console()
    for group, entries in data.items():
        table = Table(title=f"{group}=  (pick one: dattri run {group}=NAME)", show_lines=False)
        table.add_column("name", style="bold")
        table.add_column("what it is")
        table.add_column("options (defaults)")
        for name, info in entries.items():
            opts = ", ".join(f"{k}={v}" for k, v in info["options"].items())
            table.add_row(name, info["about"], opts)
        console.print(table)


def main(argv: list) -> None:
    """``dattri list [--json]``."""
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="dattri list",
        description="The attributors, datasets, models and training setups `dattri run` can use, with defaults.",
        epilog="examples:\n  dattri list\n  dattri list --json | jq .attributor",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    print_catalog(as_json=parser.parse_args(argv).json)
