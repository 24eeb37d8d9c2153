"""`dattri show` / `dattri plot` on score files of image folders, text tables and csv rows.

Score files are written directly (``io.save_scores`` with the metadata ``dattri run``
records, from ``io.score_metadata``), so these tests need no training. What show and
plot print is checked against what the fixtures wrote: file names from the tree we
made, texts from the table we wrote and the tokenizer's vocabulary, pixel colours
from the colours we painted.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch

from dattri_cli import cli
from dattri_cli.data import split_positions
from dattri_cli.data.recorded import rebuild_recorded_data, snippet, unnormalise
from dattri_cli.io import save_scores, score_metadata
from dattri_cli.show import open_score_file

Image = pytest.importorskip("PIL.Image")

CLASSES = ["bird", "cat", "dog"]
PER_CLASS = 4
WIDTH, HEIGHT = 12, 8  # non-square on purpose
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
N_TRAIN, N_TEST, SEED = 8, 4, 3
WORDS = ["good", "bad", "movie", "plot", "the", "very", "boring", "fun"]
MAX_LENGTH = 4


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _run(args: List[str]) -> int:
    try:
        cli.main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _colour(c: int, i: int) -> Tuple[int, int, int]:
    """The solid colour of image ``i`` of class ``c``: every image differs."""
    return (60 * c + 40, 30 + 40 * i, 220 - 70 * c)


def _write_scores(path: Path, node: Dict[str, Any], train_idx, test_idx, seed: int = 0) -> Path:
    """A score file whose metadata records ``node`` as `dattri run` records its dataset config."""
    meta = score_metadata(
        {"dataset": node, "seed": 0},
        "0" * 64,
        {"_target_": "dattri_cli.algorithm.GradDotAttributor"},
        {},
        {"dataset": "test"},
        [],
        [],
        {},
    )
    n, m = len(train_idx), len(test_idx)
    scores = torch.randn(n, m, generator=torch.Generator().manual_seed(seed))
    save_scores(path, scores, torch.as_tensor(train_idx), torch.as_tensor(test_idx), meta)
    return path


def _ranked(scores: torch.Tensor, col: int) -> List[int]:
    """Training rows of ``col`` from the highest score down (plain sort, not topk)."""
    column = scores[:, col].tolist()
    return sorted(range(len(column)), key=lambda r: -column[r])


# ---------------------------------------------------------------- image folders


@pytest.fixture
def images(tmp_path: Path):
    """3 classes x 4 solid-colour RGB images of 12x8 and a score file recording them (normalised)."""
    root = tmp_path / "imgs"
    paths = []
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            Image.new("RGB", (WIDTH, HEIGHT), color=_colour(c, i)).save(root / name / f"img{i:03d}.png")
            paths.append(f"{name}/img{i:03d}.png")
    node = {
        "_target_": "dattri_cli.data.image_folder.image_folder",
        "root": str(root),
        "train_root": None,
        "test_root": None,
        "image_size": [HEIGHT, WIDTH],
        "color": "rgb",
        "mean": MEAN,
        "std": STD,
        "n_train": N_TRAIN,
        "n_test": N_TEST,
        "split_seed": SEED,
        "check_files": True,
        "label_noise": 0.0,
        "label_noise_seed": 0,
    }
    train_idx, test_idx = split_positions(str(root), len(paths), N_TRAIN, N_TEST, SEED)
    path = _write_scores(tmp_path / "img.safetensors", node, train_idx, test_idx)
    return path, root, node, paths, train_idx, test_idx


def test_show_names_the_image_file_and_class_of_each_sample(images, capsys):
    path, _, _, paths, train_idx, test_idx = images
    assert _run(["show", str(path), "--test", "0,2", "--top-k", "3", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # no note, no log lines, no progress bars
    data = json.loads(captured.out)
    scores = open_score_file(path, with_data=False).full
    for test in data["tests"]:
        assert test["dataset_index"] == int(test_idx[test["column"]])
        assert test["path"] == paths[test["dataset_index"]]
        assert test["label"] == test["dataset_index"] // PER_CLASS
        assert test["class"] == CLASSES[test["label"]]
        ranked = _ranked(scores, test["column"])
        assert [e["row"] for e in test["proponents"]] == ranked[:3]
        assert [e["row"] for e in test["opponents"]] == ranked[::-1][:3]
        for entry in test["proponents"] + test["opponents"]:
            assert entry["dataset_index"] == int(train_idx[entry["row"]])
            assert entry["path"] == paths[entry["dataset_index"]]
            assert entry["class"] == CLASSES[entry["label"]] == paths[entry["dataset_index"]].split("/")[0]


def test_show_table_prints_the_file_paths(images, capsys):
    path, _, _, paths, train_idx, _ = images
    assert _run(["show", str(path), "--test", "1", "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    scores = open_score_file(path, with_data=False).full
    ranked = _ranked(scores, 1)
    for row in ranked[:2] + ranked[::-1][:2]:
        line = next(line for line in out.splitlines() if f"{row} (#{int(train_idx[row])})" in line)
        assert paths[int(train_idx[row])] in line  # one line per sample, path included


def test_unnormalise_inverts_the_normalisation_and_clips():
    x = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0))
    mean, std = [0.2, 0.5, 0.7], [0.3, 0.1, 2.0]
    m, s = torch.tensor(mean).reshape(3, 1, 1), torch.tensor(std).reshape(3, 1, 1)
    torch.testing.assert_close(unnormalise((x - m) / s, mean, std), x)
    torch.testing.assert_close(unnormalise((x - 0.5) / 0.25, 0.5, 0.25), x)
    torch.testing.assert_close(unnormalise((x - m) / s, m, s), x)
    far = torch.tensor([-10.0, 10.0, 0.25]).reshape(3, 1, 1)
    assert unnormalise(far, 0.0, 1.0).flatten().tolist() == [0.0, 1.0, 0.25]


def test_unnormalise_matches_the_unnormalised_folder(images):
    from dattri_cli.data.image_folder import ImageFolderDataset

    _, root, _, _, _, _ = images
    normalised = ImageFolderDataset(root, image_size=[HEIGHT, WIDTH], mean=MEAN, std=STD)
    raw = ImageFolderDataset(root, image_size=[HEIGHT, WIDTH])
    for i in (0, 5, 11):
        torch.testing.assert_close(unnormalise(normalised.load(i), MEAN, STD), raw.load(i), atol=1e-6, rtol=0)


def _image_axes(fig) -> List[Any]:
    return [ax for ax in fig.axes if ax.images]


def test_plot_draws_colour_images_in_their_own_aspect(images):
    pytest.importorskip("matplotlib")
    from dattri_cli.plot import draw_test

    path, _, _, paths, train_idx, test_idx = images
    sf = open_score_file(path)
    fig = draw_test(sf, 1, 3)
    fig.canvas.draw()  # axes take their images' aspect when drawn
    panels = _image_axes(fig)
    assert len(panels) == 1 + 2 * 3
    ranked = _ranked(sf.full, 1)
    samples = [int(test_idx[1])] + [int(train_idx[r]) for r in ranked[:3] + ranked[::-1][:3]]
    for ax, index in zip(panels, samples):
        pixels = torch.as_tensor(ax.images[0].get_array())
        assert tuple(pixels.shape) == (HEIGHT, WIDTH, 3)  # RGB, height x width kept
        c, i = divmod(index, PER_CLASS)
        expected = torch.tensor(_colour(c, i), dtype=pixels.dtype) / 255
        torch.testing.assert_close(pixels, expected.expand_as(pixels), atol=1e-5, rtol=0)
        assert paths[index].rsplit("/", 1)[-1] in ax.get_title()
        box = ax.get_window_extent()
        assert box.width / box.height == pytest.approx(WIDTH / HEIGHT, rel=0.05)
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_plot_png_shows_the_painted_colours(images, tmp_path):
    pytest.importorskip("matplotlib")
    path, _, _, _, _, test_idx = images
    out = tmp_path / "explain.png"
    assert _run(["plot", str(path), "--test", "0", "--top-k", "2", "--out", str(out)]) == 0
    picture = Image.open(out).convert("RGB")
    assert picture.width > 300 and picture.height > 300
    counts = {colour: n for n, colour in picture.getcolors(maxcolors=1 << 20)}
    c, i = divmod(int(test_idx[0]), PER_CLASS)
    test_colour = _colour(c, i)
    near = sum(n for colour, n in counts.items() if max(abs(a - b) for a, b in zip(colour, test_colour)) <= 2)
    assert near > 200  # the test image is drawn in its own (un-normalised) colour


def test_plot_survives_images_broken_since_the_run(images, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from dattri_cli.plot import draw_test

    path, root, _, paths, train_idx, test_idx = images
    sf = open_score_file(path)
    best = _ranked(sf.full, 0)[0]
    (root / paths[int(train_idx[best])]).write_bytes(b"not a png")
    fig = draw_test(sf, 0, 2)
    assert len(_image_axes(fig)) == 1 + 2 * 2 - 1  # the broken proponent's panel says so instead
    assert any(t.get_text() == "cannot read" for ax in fig.axes for t in ax.texts)
    assert "cannot read image" in capsys.readouterr().err
    plt.close(fig)
    (root / paths[int(test_idx[0])]).write_bytes(b"")
    fig = draw_test(sf, 0, 2)  # no test picture: the samples are listed with their files
    cells = fig.axes[0].tables[0].get_celld()
    assert cells[0, 4].get_text().get_text() == "file"
    assert cells[1, 4].get_text().get_text() == paths[int(train_idx[best])]
    assert "drawing a table instead" in capsys.readouterr().err
    plt.close(fig)


def test_grayscale_tall_images_are_drawn_gray_and_tall(tmp_path):
    pytest.importorskip("matplotlib")
    from dattri_cli.plot import draw_test

    root = tmp_path / "tall"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(5):
            Image.new("L", (6, 15), color=40 * c + 20 * i).save(root / f"c{c}" / f"{i}.png")
    node = {
        "_target_": "dattri_cli.data.image_folder.image_folder",
        "root": str(root),
        "image_size": None,
        "color": "grayscale",
        "mean": 0.5,
        "std": 0.5,
        "n_train": 6,
        "n_test": 2,
        "split_seed": 0,
    }
    train_idx, test_idx = split_positions(str(root), 10, 6, 2, 0)
    sf = open_score_file(_write_scores(tmp_path / "s.safetensors", node, train_idx, test_idx))
    fig = draw_test(sf, 0, 2)
    fig.canvas.draw()
    for ax in _image_axes(fig):
        image = ax.images[0]
        assert tuple(image.get_array().shape) == (15, 6) and image.get_cmap().name == "gray"
        box = ax.get_window_extent()
        assert box.height / box.width == pytest.approx(15 / 6, rel=0.05)
    index = int(test_idx[0])
    expected = (40 * (index // 5) + 20 * (index % 5)) / 255
    assert float(_image_axes(fig)[0].images[0].get_array().mean()) == pytest.approx(expected, abs=1e-5)


def test_separate_test_root_paths_are_relative_to_their_own_root(tmp_path, capsys):
    for part, count in (("train", 3), ("test", 2)):
        for name in ("a", "b"):
            (tmp_path / part / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (5, 4), color=(i, 0, 0)).save(tmp_path / part / name / f"{part}{i}.png")
    node = {
        "_target_": "dattri_cli.data.image_folder.image_folder",
        "train_root": str(tmp_path / "train"),
        "test_root": str(tmp_path / "test"),
        "image_size": 4,
        "split_seed": 5,
    }
    order = [torch.randperm(n, generator=torch.Generator().manual_seed(5)) for n in (6, 4)]
    path = _write_scores(tmp_path / "s.safetensors", node, order[0], order[1])
    assert _run(["show", str(path), "--json", "--test", "0,1,2,3", "--top-k", "6"]) == 0
    tests = json.loads(capsys.readouterr().out)["tests"]
    test_files = [f"{n}/test{i}.png" for n in ("a", "b") for i in range(2)]
    train_files = [f"{n}/train{i}.png" for n in ("a", "b") for i in range(3)]
    assert [t["path"] for t in tests] == [test_files[int(i)] for i in order[1]]
    assert {e["path"] for e in tests[0]["proponents"]} == set(train_files)


def test_recorded_label_noise_is_applied_to_folder_labels(images):
    path, _, node, _, train_idx, test_idx = images
    noisy = {**node, "label_noise": 0.5, "label_noise_seed": 7}
    data, note = rebuild_recorded_data({"dataset": noisy}, train_idx, test_idx)
    assert note == "" and data is not None
    clean = train_idx // PER_CLASS
    assert int((data.train.labels != clean).sum()) == round(0.5 * N_TRAIN)
    assert torch.equal(data.test.labels, test_idx // PER_CLASS)
    again, _ = rebuild_recorded_data({"dataset": noisy}, train_idx, test_idx)
    assert torch.equal(again.train.labels, data.train.labels)


def test_moved_image_folder_gives_indices_and_one_note(images, capsys):
    path, root, _, _, _, _ = images
    shutil.rmtree(root)
    assert _run(["show", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "does not exist here" in captured.err
    assert "Traceback" not in captured.err
    entry = json.loads(captured.out)["tests"][0]["proponents"][0]
    assert set(entry) == {"row", "dataset_index", "score"}


@pytest.mark.parametrize(
    "change",
    [
        {"transform": {"_target_": "pathlib.Path.touch"}},  # not an argument of image_folder
        {"mean": [{"_target_": "pathlib.Path.touch"}]},  # not plain numbers
        {"image_size": True},
        {"root": ["a", "b"]},
        {"_target_": "dattri_cli.data.image_folder.ImageFolderDataset"},  # ours, but not registered
    ],
)
def test_recorded_image_config_is_checked_not_trusted(images, change, tmp_path, capsys):
    path, _, node, _, train_idx, test_idx = images
    bad = _write_scores(tmp_path / "bad.safetensors", {**node, **change}, train_idx, test_idx)
    assert _run(["show", str(bad), "--json"]) == 0
    captured = capsys.readouterr()
    assert "labels not available" in captured.err and captured.err.count("\n") == 1
    assert "path" not in json.loads(captured.out)["tests"][0]


# ---------------------------------------------------------------- text tables


def _texts(n: int = 12) -> List[str]:
    texts = [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 6)) for i in range(n)]
    texts[3] = "the movie\nwas $very$ [bold]fun"  # a newline, mathtext and rich markup
    return texts


@pytest.fixture
def text_table(tmp_path: Path):
    pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    texts = _texts()
    labels = ["pos" if i % 3 else "neg" for i in range(len(texts))]
    table = tmp_path / "reviews.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "sentiment"])
        writer.writerows(zip(texts, labels))
    node = {
        "_target_": "dattri_cli.data.hf_table.hf_table",
        "path": str(table),
        "test_path": None,
        "text_column": "text",
        "input_columns": None,
        "label_column": "sentiment",
        "tokenizer": str(tmp_path / "tok"),
        "max_length": MAX_LENGTH,
        "pad_token_id": None,
        "label_kind": "auto",
        "split": "train",
        "n_train": 8,
        "n_test": 3,
        "split_seed": 1,
        "label_noise": 0.0,
        "label_noise_seed": 0,
    }
    train_idx, test_idx = split_positions(str(table), len(texts), 8, 3, 1)
    path = _write_scores(tmp_path / "text.safetensors", node, train_idx, test_idx, seed=2)
    return path, tmp_path / "tok", texts, labels, train_idx, test_idx


def _decoded(text: str) -> str:
    """What the word-level tokenizer keeps of ``text`` (first MAX_LENGTH words, unknown words as [UNK])."""
    return " ".join(w if w in WORDS else "[UNK]" for w in text.split()[:MAX_LENGTH])


def test_show_prints_the_decoded_text_of_each_sample(text_table, capsys):
    path, _, texts, labels, train_idx, test_idx = text_table
    assert _run(["show", str(path), "--test", "0,1,2", "--top-k", "8", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    data = json.loads(captured.out)
    seen = set()
    for test in data["tests"]:
        assert test["text"] == _decoded(texts[int(test_idx[test["column"]])])
        for entry in test["proponents"] + test["opponents"]:
            index = int(train_idx[entry["row"]])
            assert entry["text"] == _decoded(texts[index])
            assert entry["class"] == labels[index] and entry["label"] == ["neg", "pos"].index(labels[index])
            seen.add(index)
    assert 3 in seen  # the row with a newline and unknown words was shown


def test_show_falls_back_to_the_raw_text_column_without_the_tokenizer(text_table, capsys):
    path, tok, texts, labels, train_idx, _ = text_table
    shutil.rmtree(tok)
    assert _run(["show", str(path), "--test", "0", "--top-k", "8", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "tokenizer" in captured.err and "Traceback" not in captured.err
    test = json.loads(captured.out)["tests"][0]
    for entry in test["proponents"]:
        index = int(train_idx[entry["row"]])
        assert entry["text"] == snippet(texts[index])
        assert entry["class"] == labels[index]
    assert any(e["text"] == "the movie\\nwas $very$ [bold]fun" for e in test["proponents"])
    assert _run(["show", str(path), "--test", "0", "--top-k", "8"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "the movie" in line)
    assert "the movie\\nwas $very$ [bold]fun" in line  # escaped newline, markup printed as text


def test_language_model_rows_show_text_without_labels(text_table, tmp_path, capsys):
    path, tok, texts, _, _, _ = text_table
    lines = tmp_path / "lm.jsonl"
    lines.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    node = {
        "_target_": "dattri_cli.data.hf_table.hf_table",
        "path": str(lines),
        "text_column": "text",
        "label_column": None,
        "tokenizer": str(tok / "tokenizer.json"),
        "max_length": MAX_LENGTH,
        "n_train": 6,
        "n_test": 2,
        "split_seed": 0,
    }
    train_idx, test_idx = split_positions(str(lines), len(texts), 6, 2, 0)
    lm = _write_scores(tmp_path / "lm.safetensors", node, train_idx, test_idx)
    assert _run(["show", str(lm), "--json", "--top-k", "6"]) == 0
    test = json.loads(capsys.readouterr().out)["tests"][0]
    assert test["text"] == _decoded(texts[int(test_idx[0])]) and "label" not in test
    for entry in test["proponents"]:
        assert entry["text"] == _decoded(texts[int(train_idx[entry["row"]])]) and "label" not in entry


def test_plot_draws_a_labelled_table_for_text(text_table):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from dattri_cli.plot import draw_test

    path, _, texts, labels, train_idx, _ = text_table
    sf = open_score_file(path)
    fig = draw_test(sf, 0, 3)
    assert not _image_axes(fig)
    tables = [t for ax in fig.axes for t in ax.tables]
    assert len(tables) == 1
    cells = tables[0].get_celld()
    header = [cells[0, c].get_text().get_text() for c in range(5)]
    assert header == ["rank", "train index", "label", "score", "text"]
    ranked = _ranked(sf.full, 0)
    for r, row in enumerate(ranked[:3] + ranked[::-1][:3], start=1):
        index = int(train_idx[row])
        line = [cells[r, c].get_text().get_text() for c in range(5)]
        assert line[1].startswith(f"{index} ")
        assert labels[index] in line[2]
        assert float(line[3]) == pytest.approx(float(sf.full[row, 0]), rel=1e-3)
        assert line[4] == _decoded(texts[index]).replace("$", r"\$")
    _check_histogram(fig, sf.full.shape[0])
    plt.close(fig)


def _check_histogram(fig, n_train: int) -> None:
    hist = [ax for ax in fig.axes if ax.patches and not ax.images and not ax.tables]
    assert len(hist) == 1
    ax = hist[0]
    assert ax.get_yscale() == "log"
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    assert sum(p.get_height() for p in ax.patches) == n_train  # every training score is counted
    assert ax.get_ylim()[0] < 1  # a bin holding one sample still shows a bar


# ---------------------------------------------------------------- csv rows and no data


@pytest.fixture
def csv_rows(tmp_path: Path):
    rows = [(i * 0.5, (i % 3) - 1.0, i % 2) for i in range(20)]
    table = tmp_path / "rows.csv"
    table.write_text("a,b,label\n" + "".join(f"{a},{b},{y}\n" for a, b, y in rows))
    node = {
        "_target_": "dattri_cli.data.from_files",
        "path": str(table),
        "test_path": None,
        "label_column": "label",
        "n_train": 14,
        "n_test": 4,
        "split_seed": 2,
        "label_noise": 0.0,
        "label_noise_seed": 0,
    }
    train_idx, test_idx = split_positions(table.name, len(rows), 14, 4, 2)
    return _write_scores(tmp_path / "rows.safetensors", node, train_idx, test_idx), rows, train_idx


def test_show_csv_rows_give_row_index_and_label(csv_rows, capsys):
    path, rows, train_idx = csv_rows
    assert _run(["show", str(path), "--json", "--top-k", "3"]) == 0
    test = json.loads(capsys.readouterr().out)["tests"][0]
    for entry in test["proponents"] + test["opponents"]:
        assert set(entry) == {"row", "dataset_index", "score", "label"}
        assert entry["dataset_index"] == int(train_idx[entry["row"]])
        assert entry["label"] == rows[entry["dataset_index"]][2]


def test_plot_csv_rows_as_a_table_with_values(csv_rows):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from dattri_cli.plot import draw_test

    path, rows, train_idx = csv_rows
    sf = open_score_file(path)
    fig = draw_test(sf, 0, 2)
    cells = fig.axes[0].tables[0].get_celld()
    assert cells[0, 4].get_text().get_text() == "values"
    row = _ranked(sf.full, 0)[0]
    a, b, label = rows[int(train_idx[row])]
    assert cells[1, 4].get_text().get_text() == f"{a:.3g}, {b:.3g}"
    assert cells[1, 2].get_text().get_text() == str(label)
    _check_histogram(fig, 14)
    plt.close(fig)


def test_plot_without_a_dataset_is_a_titled_log_histogram(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from dattri_cli.plot import draw_test

    path = _write_scores(tmp_path / "s.safetensors", {"_target_": "somebody.else"}, list(range(30)), [5, 6])
    sf = open_score_file(path)
    assert sf.data is None and "not a built-in dataset" in sf.labels_note
    fig = draw_test(sf, 1, 3)
    _check_histogram(fig, 30)
    assert "dataset index 6" in fig.axes[0].get_title()
    plt.close(fig)
    assert _run(["plot", str(path), "--out", str(tmp_path / "h.png")]) == 0
    assert "histogram only" in capsys.readouterr().err


def test_snippet_is_one_escaped_short_line():
    assert snippet("a\nb\tc\\d\r") == "a\\nb\\tc\\\\d\\r"
    long = snippet("word " * 100, width=20)
    assert len(long) == 20 and long.endswith("…") and "\n" not in long
