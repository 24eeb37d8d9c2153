"""Local tables through ``datasets``: tokenised text with padding collate, numeric columns, labels, refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dattri_cli.data import Split, split_positions
from dattri_cli.errors import DataError

datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from dattri_cli.data.hf_table import hf_table, load_tokenizer, pad_collate, read_table  # noqa: E402

WORDS = ["good", "bad", "movie", "plot", "the", "very", "boring", "fun"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _tokenizer(folder: Path, pad: bool = True) -> Path:
    """A word-level tokenizer built from a fixed vocabulary, saved as folder/tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {**({"[PAD]": 0} if pad else {}), "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def _reviews(n: int = 12):
    texts = [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 5)) for i in range(n)]
    labels = ["pos" if i % 3 else "neg" for i in range(n)]
    return texts, labels


def _csv(path: Path, n: int = 12) -> Path:
    texts, labels = _reviews(n)
    path.write_text("text,sentiment\n" + "".join(f"{t},{y}\n" for t, y in zip(texts, labels)))
    return path


def test_text_table_tokenises_splits_and_pads(tmp_path: Path) -> None:
    tok = _tokenizer(tmp_path / "tok")
    split = hf_table(
        _csv(tmp_path / "r.csv"),
        text_column="text",
        label_column="sentiment",
        tokenizer=tok,
        max_length=4,
        n_train=8,
        n_test=3,
        split_seed=5,
    )
    train_idx, test_idx = split_positions("x", 12, 8, 3, 5)
    assert torch.equal(split.train_indices, train_idx) and torch.equal(split.test_indices, test_idx)
    assert split.classes == ["neg", "pos"] and split.num_classes == 2
    texts, labels = _reviews()
    assert split.y_train.tolist() == [int(labels[i] == "pos") for i in train_idx.tolist()]
    train, _ = split.loaders(4, 2)
    batch = next(iter(train))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].dtype == torch.int64 and batch["labels"].dtype == torch.int64
    for row, i in enumerate(train_idx[:4].tolist()):
        words = texts[i].split()[:4]
        n = len(words)
        assert batch["input_ids"][row, :n].tolist() == [WORDS.index(w) + 2 for w in words]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert batch["input_ids"][row, n:].eq(0).all()
    assert (
        split.fingerprint()
        == hf_table(
            tmp_path / "r.csv",
            text_column="text",
            label_column="sentiment",
            tokenizer=tok,
            max_length=4,
            n_train=8,
            n_test=3,
            split_seed=5,
        ).fingerprint()
    )


def test_language_modelling_rows_from_jsonl_label_padding_with_ignore_index(tmp_path: Path) -> None:
    tok = _tokenizer(tmp_path / "tok")
    texts, _ = _reviews(6)
    (tmp_path / "lm.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    split = hf_table(
        tmp_path / "lm.jsonl",
        text_column="text",
        label_column=None,
        tokenizer=tok / "tokenizer.json",
        n_train=4,
        n_test=2,
    )
    assert split.y_train is None and split.num_classes is None
    batch = split.collate_fn()([split.train[i] for i in range(4)])
    assert torch.equal(
        batch["labels"][batch["attention_mask"] == 1], batch["input_ids"][batch["attention_mask"] == 1]
    )
    assert batch["labels"][batch["attention_mask"] == 0].eq(-100).all()


def test_numeric_columns_give_a_split_with_float_targets(tmp_path: Path) -> None:
    table = datasets.Dataset.from_dict(
        {"a": [float(i) for i in range(10)], "b": [1.0] * 10, "y": [i * 0.37 for i in range(10)]}
    )
    table.to_parquet(str(tmp_path / "t.parquet"))
    split = hf_table(tmp_path / "t.parquet", input_columns=["b", "a"], label_column="y", n_train=6, n_test=2)
    assert isinstance(split, Split) and split.x_train.shape == (6, 2)
    assert split.y_train.dtype == torch.float32
    torch.testing.assert_close(split.y_train, split.x_train[:, 1] * 0.37)
    ints = hf_table(tmp_path / "t.parquet", input_columns=["a"], label_column="y", label_kind="float")
    assert ints.y_test.dtype == torch.float32
    with pytest.raises(DataError, match="label_kind=float"):
        hf_table(tmp_path / "t.parquet", input_columns=["a"], label_column="y", label_kind="class")


def test_save_to_disk_folders_and_separate_test_table(tmp_path: Path) -> None:
    tok = _tokenizer(tmp_path / "tok")
    texts, labels = _reviews(10)
    table = datasets.Dataset.from_dict({"text": texts, "label": [int(y == "pos") for y in labels]})
    datasets.DatasetDict({"train": table, "validation": table.select(range(3))}).save_to_disk(
        str(tmp_path / "dd")
    )
    table.save_to_disk(str(tmp_path / "plain"))
    assert read_table(tmp_path / "dd", split="validation").num_rows == 3
    with pytest.raises(DataError, match=r"holds splits \['train', 'validation'\], not 'test'"):
        read_table(tmp_path / "dd", split="test")
    split = hf_table(
        tmp_path / "plain",
        test_path=tmp_path / "dd",
        split="train",
        text_column="text",
        tokenizer=tok,
        n_test=4,
    )
    assert (len(split.train), len(split.test)) == (10, 4) and split.num_classes == 2


def test_refusals_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = _tokenizer(tmp_path / "tok")
    csv = _csv(tmp_path / "r.csv")
    cases = [
        (
            dict(text_column="body", label_column="sentiment", tokenizer=tok),
            r"has no column 'body'.*dataset.text_column",
        ),
        (dict(text_column="text", label_column="sentiment"), "needs dataset.tokenizer"),
        (dict(text_column="text", input_columns=["a"]), "exactly one"),
        (
            dict(
                text_column="text",
                label_column="sentiment",
                tokenizer=_tokenizer(tmp_path / "nopad", pad=False),
            ),
            "no padding token",
        ),
        (
            dict(text_column="text", label_column="sentiment", tokenizer=tok, n_train=11, n_test=3),
            "fewer than n_train",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(DataError, match=message) as info:
            hf_table(csv, **kwargs)
        assert "\n" not in str(info.value)
    (tmp_path / "t.tsv").write_text("a\tb\n")
    with pytest.raises(DataError, match="unsupported table file type"):
        read_table(tmp_path / "t.tsv")
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="no rows"):
        hf_table(tmp_path / "empty.csv", text_column="text", tokenizer=tok)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"pip install 'dattri-cli\[text\]'"):
        read_table(csv)


def test_pad_collate_keeps_scalar_labels_and_ids_integer() -> None:
    collate = pad_collate(pad_token_id=7)
    batch = collate(
        [
            {"input_ids": torch.tensor([3, 4, 5]), "labels": torch.tensor(1)},
            {"input_ids": torch.tensor([6]), "labels": torch.tensor(0)},
        ]
    )
    assert batch["input_ids"].tolist() == [[3, 4, 5], [6, 7, 7]] and batch["labels"].tolist() == [1, 0]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_tokenizer_folder_without_tokenizer_json_goes_through_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\ngood\nmovie\n")
    transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(str(tmp_path / "bert_tok"))
    (tmp_path / "bert_tok" / "tokenizer.json").unlink(missing_ok=True)
    loaded = load_tokenizer(tmp_path / "bert_tok")
    ids = loaded.encode(["good movie"])[0]
    assert loaded.pad_token_id == 0 and (ids[0], ids[-1]) == (
        2,
        3,
    )  # [CLS] ... [SEP]: the transformers tokenizer ran
    with pytest.raises(DataError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path)


def test_text_table_batches_feed_a_tiny_bert_through_tracin(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from dattri_cli.algorithm.tracin import TracInAttributor
    from dattri_cli.task import AttributionTask
    from dattri_cli.tasks import classification

    transformers.utils.logging.set_verbosity_error()
    split = hf_table(
        _csv(tmp_path / "r.csv"),
        text_column="text",
        label_column="sentiment",
        tokenizer=_tokenizer(tmp_path / "tok"),
        n_train=8,
        n_test=3,
    )
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(WORDS) + 2,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=split.num_classes,
    )
    model = transformers.BertForSequenceClassification(config).eval()
    funcs = classification(model)
    attributor = TracInAttributor(
        AttributionTask(funcs.loss_func, model, [model.state_dict()], funcs.target_func),
        [1.0],
        normalized_grad=False,
    )
    attributor.cache()
    scores = attributor.attribute(*split.loaders(3, 2))
    assert scores.shape == (8, 3) and bool(torch.isfinite(scores).all()) and float(scores.abs().max()) > 0
