"""Write the small data files of the examples (nothing is downloaded): ``python examples/make_data.py [OUT]``.

OUT (default ``examples/data``) gets:

* ``images/<class>/<n>.png``: 3 classes of 16x16 RGB images (a coloured square on noise);
* ``text/reviews.csv`` (``text``, ``label``) and ``text/tokenizer.json``, a word-level
  tokenizer trained on it with ``tokenizers`` (``[PAD]``, ``[UNK]``);
* ``lm/corpus.txt`` (one short sentence a line) and ``lm/tokenizer.json``;
* ``tabular/houses.csv``: 4 numeric features and a float ``price``.

The configs in ``examples/experiment/`` read these paths relative to the working
directory, so run both from the same place (the repository root).
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

import numpy as np

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 60, 220)}
GOOD = ["great", "lovely", "fine", "superb", "good", "nice", "bright", "fun"]
BAD = ["awful", "poor", "dull", "bad", "broken", "sad", "boring", "weak"]
FILLER = ["the", "film", "was", "very", "a", "plot", "and", "cast", "really", "so"]
SUBJECTS = ["the cat", "a dog", "my friend", "the bird", "our teacher"]
VERBS = ["sees", "likes", "finds", "follows", "hears"]
OBJECTS = ["the ball", "a tree", "the river", "some bread", "the moon"]


def images(out: Path, per_class: int, rng: np.random.Generator) -> None:
    from PIL import Image  # noqa: PLC0415 - the vision extra

    for name, colour in COLORS.items():
        folder = out / "images" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, size=(16, 16, 3)).astype(np.uint8)
            top, left = rng.integers(0, 8, size=2)
            pixels[top : top + 8, left : left + 8] = colour
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def word_tokenizer(texts: list, path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: PLC0415 - the text extra

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))


def text(out: Path, rows: int, rnd: random.Random) -> None:
    lines = []
    for i in range(rows):
        label = i % 2
        words = [rnd.choice(FILLER) for _ in range(rnd.randint(3, 7))]
        words += [rnd.choice(GOOD if label else BAD) for _ in range(rnd.randint(1, 3))]
        rnd.shuffle(words)
        lines.append((" ".join(words), label))
    folder = out / "text"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "reviews.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(lines)
    word_tokenizer([t for t, _ in lines], folder / "tokenizer.json")


def corpus(out: Path, rows: int, rnd: random.Random) -> None:
    lines = [
        f"{rnd.choice(SUBJECTS)} {rnd.choice(VERBS)} {rnd.choice(OBJECTS)}"
        + (" again" if rnd.random() < 0.3 else "")
        for _ in range(rows)
    ]
    folder = out / "lm"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text("\n".join(lines) + "\n")
    word_tokenizer(lines, folder / "tokenizer.json")


def tabular(out: Path, rows: int, rng: np.random.Generator) -> None:
    x = rng.normal(size=(rows, 4))
    price = x @ np.array([1.5, -2.0, 0.5, 0.0]) + 0.1 * rng.normal(size=rows)
    folder = out / "tabular"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "houses.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rooms", "age", "distance", "noise", "price"])
        writer.writerows([[f"{v:.5f}" for v in (*row, p)] for row, p in zip(x, price)])


def main(out: Path) -> None:
    """Write every example's data under ``out``."""
    rng, rnd = np.random.default_rng(0), random.Random(0)
    images(out, 12, rng)
    text(out, 60, rnd)
    corpus(out, 60, rnd)
    tabular(out, 80, rng)
    print(f"wrote example data under {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/data"))
