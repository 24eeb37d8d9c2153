"""``dattri merge SHARDS... out=PATH``: assemble row-block shard files into one score file."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List

from dattri_cli.errors import ConfigError

USAGE = """usage: dattri merge SHARD_FILE... out=PATH [overwrite=false]

Assemble the shard files written by `dattri run ... shard.index=i shard.count=N`, or
by one run with output.rows_per_file (paths, a directory holding them, or a quoted
glob) into one score file. The shards
must share one config hash and cover every training row exactly once; the merged
file is written atomically and equals the file an unsharded run writes.
Given one run folder, shards of the same job in its sibling folders are found too
(shard runs without out= get one timestamped folder each).

examples:
  dattri merge outputs/run/scores-*-of-00004.safetensors out=scores.safetensors
  dattri merge outputs/run/ out=scores.safetensors
"""


def main(args: List[str]) -> None:
    """Parse ``args`` and merge."""
    from dattri_cli.io import merge_shards  # noqa: PLC0415

    if not args or any(a in {"-h", "--help"} for a in args):
        print(USAGE)
        return
    out, overwrite, sources = None, True, []
    for arg in args:
        if arg.startswith("out="):
            out = arg[4:]
        elif arg.startswith("overwrite="):
            overwrite = arg.split("=", 1)[1].lower() in {"1", "true", "yes"}
        else:
            sources.append(arg)
    if out is None:
        msg = "dattri merge needs out=PATH for the merged score file"
        raise ConfigError(msg)
    if not sources:
        msg = "dattri merge needs shard files, a directory or a glob"
        raise ConfigError(msg)
    path = merge_shards(sources, Path(out), overwrite=overwrite)
    print(f"merged shards into {path}", file=sys.stdout)
