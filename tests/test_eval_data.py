"""Folder layouts, decoding failures and background loading of tome-eval's data module."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.data import ImageNetInfo
from tiny import BASES, solid_image

from tome_eval.data import ImageFiles, LabelSpace, batches, in_background, list_images
from tome_eval.errors import EvalInputError
from tome_eval.runner import mean_cosine_between

IMAGENET = LabelSpace(1000, ImageNetInfo("imagenet-1k").label_names())
TEN = LabelSpace(10)


def to_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.resize((4, 4)))).permute(2, 0, 1).float()


def test_wordnet_folders_map_to_imagenet_indices(tmp_path):
    solid_image(tmp_path / "n01440764" / "a.JPEG", BASES[0])  # tench, index 0
    solid_image(tmp_path / "n15075141" / "nested" / "b.png", BASES[1])  # toilet tissue, index 999
    listing = list_images(tmp_path, IMAGENET)
    assert listing.layout == "WordNet-id class folders"
    assert [(p.path.name, p.label) for p in listing.samples] == [("a.JPEG", 0), ("b.png", 999)]


def test_wordnet_id_outside_the_label_set_is_rejected(tmp_path):
    solid_image(tmp_path / "n99999999" / "a.png", BASES[0])
    with pytest.raises(EvalInputError, match="not one of the model's 1000 classes"):
        list_images(tmp_path, IMAGENET)


def test_labels_file_takes_indices_and_wordnet_ids(tmp_path):
    solid_image(tmp_path / "x" / "a.png", BASES[0])
    solid_image(tmp_path / "b.png", BASES[1])
    (tmp_path / "labels.tsv").write_text("# file\tclass\nx/a.png\t7\n\nb.png\tn01443537\n")
    listing = list_images(tmp_path, IMAGENET)
    assert listing.layout == "labels.tsv"
    assert [s.label for s in listing.samples] == [7, 1]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("a.png 3", "expected FILE<TAB>CLASS"),
        ("a.png\tcat", "neither a WordNet id"),
        ("a.png\t10", "out of range"),
        ("../a.png\t1", "points outside the folder"),
    ],
)
def test_bad_labels_file_lines_name_the_line(tmp_path, line, message):
    (tmp_path / "labels.tsv").write_text(f"ok.png\t1\n{line}\n")
    with pytest.raises(EvalInputError, match=f"line 2: .*{message}"):
        list_images(tmp_path, TEN)


def test_unlabelled_takes_every_image_below(tmp_path):
    solid_image(tmp_path / "cats" / "a.png", BASES[0])
    solid_image(tmp_path / "b.png", BASES[1])
    (tmp_path / "readme.md").write_text("hi")
    listing = list_images(tmp_path, TEN, unlabelled=True)
    assert not listing.labelled and listing.ignored == 1
    assert sorted(s.path.name for s in listing.samples) == ["a.png", "b.png"]


def test_unreadable_files_are_counted_per_batch_and_order_kept(tmp_path):
    for i in range(5):
        solid_image(tmp_path / f"{i}.png", BASES[i % 4])
    (tmp_path / "2.png").write_bytes(b"truncated")
    (tmp_path / "4.png").write_bytes((tmp_path / "1.png").read_bytes()[:40])
    dataset = ImageFiles(list_images(tmp_path, TEN).samples, to_tensor)
    for workers in (0, 1):
        got = list(batches(dataset, batch_size=2, workers=workers))
        assert [b.indices.tolist() for b in got] == [[0, 1], [3], []]
        assert [b.unreadable for b in got] == [[], [2], [4]]
        assert got[0].images.shape == (2, 3, 4, 4) and got[2].images.numel() == 0


def test_background_loading_is_bounded_passes_errors_and_stops_early():
    produced = []

    def items():
        for i in range(100):
            produced.append(i)
            yield i

    stream = in_background(items(), depth=2)
    assert next(stream) == 0
    stream.close()  # the consumer leaves early: the producer thread must stop, not run on
    assert len(produced) <= 4
    assert not any(t.name == "tome-eval-loader" for t in threading.enumerate())

    def failing():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(in_background(failing(), depth=2))


def test_mean_cosine_between_images():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    expected = (0 + 2 * 0.5**0.5) / 3
    assert mean_cosine_between(features) == pytest.approx(expected)
    assert mean_cosine_between(features[:1]) is None


def test_missing_folder(tmp_path: Path):
    with pytest.raises(EvalInputError, match="is not a folder"):
        list_images(tmp_path / "nope", TEN)
