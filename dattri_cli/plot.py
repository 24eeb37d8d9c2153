"""``dattri plot``: a test sample beside its strongest proponents and opponents, and a histogram.

Image data is drawn as pictures (colour, each in its own aspect ratio, un-normalised
with the recorded mean / std); text and tabular data as a table picture (rank, train
index, label, score, text or values). The score histogram has a log-scaled count axis.

matplotlib is optional (``pip install 'dattri-cli[plot]'``); without it the command
says so instead of failing with an import error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

from dattri_cli.errors import DattriError
from dattri_cli.show import ScoreFile, open_score_file, parse_test_indices, top_training_samples

EXAMPLES = """examples:
  dattri plot scores.safetensors --test 3                  # writes scores.test3.png beside the file
  dattri plot scores.safetensors --test 3 --top-k 8 --out /tmp/explain.png
"""


def _pyplot() -> Any:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as exc:
        msg = "dattri plot needs matplotlib: pip install 'dattri-cli[plot]' (or pip install matplotlib)"
        raise DattriError(msg) from exc
    return plt


#: width of one picture panel, inches
PANEL_INCHES = 1.7
#: height of the score histogram, inches
HISTOGRAM_INCHES = 2.8
#: characters of a text or values cell in the table picture
CELL_CHARS = 70


def _mpl_text(text: str) -> str:
    """User text for matplotlib: ``$`` would start mathtext (and fail on odd TeX)."""
    return text.replace("$", r"\$")


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _label(entry: Dict[str, Any]) -> str:
    from dattri_cli.show import label_text  # noqa: PLC0415 - avoid a cycle at import time

    return label_text(entry)


def draw_test(sf: ScoreFile, col: int, k: int) -> Any:
    """A matplotlib figure explaining test column ``col``: samples (pictures or a table) and a histogram.

    Image data (image folders, digits, image-shaped files): the test picture, then its
    ``k`` strongest proponents and opponents, drawn in colour and in their own aspect
    ratio, un-normalised to ``[0, 1]``. Text and tabular data: a table of the same
    samples (rank, train index, label, score, text or values). Always: a histogram of
    the column's scores with a log-scaled count axis, so its tails show.
    """
    plt = _pyplot()
    top = top_training_samples(sf, col, k)
    data = sf.data
    test_image = None
    if data is not None:
        try:
            test_image = data.image("test", col)
        except DattriError as exc:  # replaced or broken since the run: list the samples instead
            print(f"note: {exc}; drawing a table instead of images", file=sys.stderr)
    if test_image is not None:
        fig, hist_ax = _draw_images(plt, sf, col, top, test_image)
    elif data is not None:
        fig, hist_ax = _draw_table(plt, sf, col, top)
    else:
        fig = plt.figure(figsize=(8, HISTOGRAM_INCHES + 0.4))
        hist_ax = fig.add_subplot(1, 1, 1)
    _histogram(hist_ax, sf, col)
    fig.tight_layout()
    return fig


def _show_image(ax: Any, image: Any, invert_gray: bool) -> None:
    """Draw a ``(C, H, W)`` tensor in ``[0, 1]``: RGB as colour, one channel as gray."""
    image = image.detach().float().cpu()
    if image.shape[0] == 1:
        ax.imshow(image[0].numpy(), cmap="gray_r" if invert_gray else "gray", vmin=0.0, vmax=1.0)
    else:
        ax.imshow(image[:3].permute(1, 2, 0).numpy(), vmin=0.0, vmax=1.0)
    ax.set_xticks([])
    ax.set_yticks([])


def _panel_title(head: str, entry: Dict[str, Any]) -> str:
    lines = [head]
    label = _label(entry)
    if label:
        lines.append(f"label {_cut(label, 22)}")
    if entry.get("path"):
        lines.append(_cut(entry["path"].rsplit("/", 1)[-1], 22))
    return _mpl_text("\n".join(lines))


def _draw_images(plt: Any, sf: ScoreFile, col: int, top: Dict[str, Any], test_image: Any) -> Tuple[Any, Any]:
    data = sf.data
    n = max(len(top["proponents"]), 1)
    height, width = int(test_image.shape[-2]), int(test_image.shape[-1])
    panel_h = min(max(PANEL_INCHES * height / width, 0.6), 2 * PANEL_INCHES)
    row_h = panel_h + 0.6  # room for three title lines
    fig = plt.figure(figsize=(max(7.0, (n + 1) * PANEL_INCHES + 0.4), 2 * row_h + HISTOGRAM_INCHES))
    grid = fig.add_gridspec(3, n + 1, height_ratios=[row_h, row_h, HISTOGRAM_INCHES])
    test = {"dataset_index": int(sf.test_indices[col]), **data.describe("test", col)}
    ax = fig.add_subplot(grid[0, 0])
    _show_image(ax, test_image, data.invert_gray)
    ax.set_title(_panel_title(f"test {col}", test), fontsize=8)
    for r, (kind, entries) in enumerate((("helps", top["proponents"]), ("hurts", top["opponents"]))):
        for i, e in enumerate(entries):
            ax = fig.add_subplot(grid[r, i + 1])
            try:
                image = data.image("train", e["row"])
            except DattriError as exc:  # an image replaced or broken since the run: say so in its panel
                ax.text(0.5, 0.5, "cannot read", ha="center", va="center", fontsize=8, transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
                print(f"note: {exc}", file=sys.stderr)
            else:
                _show_image(ax, image, data.invert_gray)
            ax.set_title(_panel_title(f"{kind} #{i + 1} {e['score']:+.3g}", e), fontsize=7)
    return fig, fig.add_subplot(grid[2, :])


def _draw_table(plt: Any, sf: ScoreFile, col: int, top: Dict[str, Any]) -> Tuple[Any, Any]:
    data = sf.data
    test = {"dataset_index": int(sf.test_indices[col]), **data.describe("test", col)}
    what = "text" if data.kind == "text" else "file" if "path" in test else "values"

    def content(which: str, row: int, entry: Dict[str, Any]) -> str:
        if what != "values":
            return entry.get("path" if what == "file" else "text", "")
        return data.values(which, row, CELL_CHARS) or ""

    rows = []
    for kind, entries in (("helps", top["proponents"]), ("hurts", top["opponents"])):
        for i, e in enumerate(entries):
            rows.append(
                [
                    f"{kind} #{i + 1}",
                    f"{e['dataset_index']} (row {e['row']})",
                    _cut(_label(e), 16) or "-",
                    f"{e['score']:+.4g}",
                    _cut(content("train", e["row"], e), CELL_CHARS),
                ]
            )
    table_h = 0.5 + 0.22 * (len(rows) + 1)
    fig = plt.figure(figsize=(11.0, table_h + HISTOGRAM_INCHES + 0.3))
    grid = fig.add_gridspec(2, 1, height_ratios=[table_h, HISTOGRAM_INCHES])
    ax = fig.add_subplot(grid[0, 0])
    ax.axis("off")
    label = _label(test)
    title = f"test column {col} (dataset index {test['dataset_index']}" + (
        f", label {label})" if label else ")"
    )
    title += f": {_cut(content('test', col, test), CELL_CHARS)}"
    ax.set_title(_mpl_text(title), fontsize=9, loc="left")
    table = ax.table(
        cellText=[[_mpl_text(c) for c in r] for r in rows],
        colLabels=["rank", "train index", "label", "score", what],
        colWidths=[0.08, 0.13, 0.12, 0.09, 0.58],
        cellLoc="left",
        loc="upper center",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    for (r, c), cell in table.get_celld().items():
        cell.PAD = 0.04 if c < 4 else 0.01  # a fraction of the cell's width: keep the wide text column flush
        if r == 0:
            cell.set_text_props(weight="bold")
    return fig, fig.add_subplot(grid[1, 0])


def _histogram(ax: Any, sf: ScoreFile, col: int) -> None:
    """All training scores of column ``col``, count axis log-scaled so single outliers stay visible."""
    values = sf.column(col).double().cpu().tolist()
    counts, _, _ = ax.hist(values, bins=50, color="#4477aa", log=True)
    ax.set_yscale("log")
    ax.set_ylim(0.6, max(float(counts.max()), 1.0) * 2.0)  # a bin of one sample still shows a bar
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: PLC0415 - optional

    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 1, 10, 100 (not 10^0)
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.axvline(0.0, color="#888888", linewidth=0.8, linestyle=":")
    ax.set_xlabel(f"score of each training sample on test column {col} (positive = helps)")
    ax.set_ylabel("training samples (log scale)")
    ax.set_title(
        f"scores of all {len(values)} training samples on test column {col} "
        f"(dataset index {int(sf.test_indices[col])})",
        fontsize=9,
    )


def plot_test(sf: ScoreFile, col: int, k: int, out: Path) -> Path:
    """Write a PNG explaining test column ``col``; returns the path written."""
    plt = _pyplot()
    fig = draw_test(sf, col, k)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: List[str]) -> None:
    """``dattri plot PATH --test 3 [--top-k 5] [--out FILE.png]``."""
    parser = argparse.ArgumentParser(
        prog="dattri plot",
        description=(
            "Picture of a test sample and its top proponents/opponents (images, or a table for text "
            "and tabular data), and a score histogram."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("path", type=Path, help="a scores.safetensors file written by `dattri run`")
    parser.add_argument("--test", default="0", help="test columns, comma-separated (default 0); one PNG each")
    parser.add_argument("--top-k", type=int, default=5, help="proponents and opponents shown (default 5)")
    parser.add_argument(
        "--out", type=Path, help="PNG path (one test column only); default beside the score file"
    )
    args = parser.parse_args(argv)
    _pyplot()  # fail early and clearly without matplotlib
    sf = open_score_file(args.path)
    if sf.labels_note:
        rest = "; plotting the score histogram only" if sf.data is None else ""
        print(f"note: {sf.labels_note}{rest}", file=sys.stderr)
    cols = parse_test_indices(args.test, sf.shape[1])
    if args.out and len(cols) > 1:
        msg = "--out names one file: give a single --test column, or leave --out out"
        raise DattriError(msg)
    for col in cols:
        out = args.out or args.path.with_name(f"{args.path.stem}.test{col}.png")
        print(plot_test(sf, col, max(1, args.top_k), out))
