"""Image folders for evaluation: find the images and their labels, decode them, batch them.

Layouts, in the order they are recognised:

* ``labels.tsv`` in the folder: one ``FILE<TAB>CLASS`` line per image (FILE relative to the folder,
  CLASS a class index or a WordNet id); lines starting with ``#`` are comments.
* class folders: every subfolder is one class, named by WordNet id (``n01440764``, ImageNet style)
  or by class index (``0``, ``17``); images anywhere below it belong to that class.
* unlabelled: the images directly in the folder (or, with ``unlabelled=True``, every image below it).

Files that fail to decode are skipped and counted, never fatal.
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .errors import EvalInputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
LABELS_FILE = "labels.tsv"
UNLABELLED = -1
_WORDNET_ID = re.compile(r"n\d{8}")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int = UNLABELLED


@dataclass(frozen=True)
class Listing:
    """The images found in a folder, and how they were labelled."""

    samples: list[Sample]
    layout: str
    ignored: int = 0
    """Files skipped without opening: not images by their suffix, or outside the class folders."""

    @property
    def labelled(self) -> bool:
        return self.layout != "unlabelled"


@dataclass(frozen=True)
class LabelSpace:
    """The classes a model predicts, for turning folder names and label columns into class indices."""

    num_classes: int
    wordnet_ids: Sequence[str] | None = None
    """One WordNet id per class index when the model predicts an ImageNet label set."""

    def resolve(self, name: str, where: str) -> int:
        if _WORDNET_ID.fullmatch(name):
            if self.wordnet_ids is None:
                raise EvalInputError(
                    f"{where}: {name!r} is a WordNet id, but the model's {self.num_classes} "
                    "classes are not an ImageNet label set; use class indices instead"
                )
            try:
                return self.wordnet_ids.index(name)
            except ValueError:
                raise EvalInputError(
                    f"{where}: WordNet id {name!r} is not one of the model's {self.num_classes} classes"
                ) from None
        if not name.isdigit():
            raise EvalInputError(
                f"{where}: {name!r} is neither a WordNet id (like n01440764) nor a class "
                f"index; name class folders by either, add a {LABELS_FILE} "
                "(file<TAB>class index), or pass --unlabelled"
            )
        index = int(name)
        if self.num_classes and index >= self.num_classes:
            raise EvalInputError(
                f"{where}: class index {index} is out of range for a model with "
                f"{self.num_classes} classes (0..{self.num_classes - 1})"
            )
        return index


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _files_below(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def list_images(root: Path, labels: LabelSpace, unlabelled: bool = False) -> Listing:
    """Find the images under ``root`` and their class indices (see the module docstring)."""
    if not root.is_dir():
        raise EvalInputError(f"{root} is not a folder")
    if unlabelled:
        listing = _split_images(_files_below(root), UNLABELLED, "unlabelled")
    elif (root / LABELS_FILE).is_file():
        listing = _from_labels_file(root, labels)
    else:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if folders:
            listing = _from_class_folders(root, folders, labels)
        else:
            files = sorted(p for p in root.iterdir() if p.is_file())
            listing = _split_images(files, UNLABELLED, "unlabelled")
    if not listing.samples:
        suffixes = ", ".join(IMAGE_SUFFIXES)
        raise EvalInputError(
            f"no images found in {root} (looked for files ending in {suffixes}; layout: {listing.layout})"
        )
    return listing


def _split_images(files: Iterable[Path], label: int, layout: str) -> Listing:
    files = list(files)
    samples = [Sample(p, label) for p in files if _is_image(p)]
    return Listing(samples, layout, ignored=len(files) - len(samples))


def _from_class_folders(root: Path, folders: list[Path], labels: LabelSpace) -> Listing:
    samples: list[Sample] = []
    ignored = sum(1 for p in root.iterdir() if p.is_file())
    for folder in folders:
        label = labels.resolve(folder.name, f"class folder {folder.name!r}")
        found = _split_images(_files_below(folder), label, "")
        samples += found.samples
        ignored += found.ignored
    kind = "WordNet-id" if all(_WORDNET_ID.fullmatch(f.name) for f in folders) else "class-index"
    return Listing(samples, f"{kind} class folders", ignored)


def _from_labels_file(root: Path, labels: LabelSpace) -> Listing:
    samples = []
    text = (root / LABELS_FILE).read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        where = f"{LABELS_FILE} line {number}"
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) != 2 or not parts[0] or not parts[1].strip():
            raise EvalInputError(f"{where}: expected FILE<TAB>CLASS, got {line!r}")
        path = (root / parts[0]).resolve()
        if root.resolve() not in path.parents:
            raise EvalInputError(f"{where}: {parts[0]!r} points outside the folder")
        samples.append(Sample(path, labels.resolve(parts[1].strip(), where)))
    return Listing(samples, LABELS_FILE)


# ---- decoding and batching ----


@dataclass
class Batch:
    images: torch.Tensor
    """[B, 3, H, W] the images that decoded."""
    labels: torch.Tensor
    """[B] class index, or -1 where unlabelled."""
    indices: torch.Tensor
    """[B] position of each image in the listing."""
    unreadable: list[int] = field(default_factory=list)
    """Listing positions of the files in this batch that failed to decode."""


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class ImageFiles(Dataset):
    """Decodes listed images with the model's eval transform; a file that fails gives ``None``."""

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, int]:
        sample = self.samples[index]
        try:
            with Image.open(sample.path) as image:
                tensor = self.transform(image.convert("RGB"))
        except _DECODE_ERRORS:
            return None, sample.label, index
        return tensor, sample.label, index


def collate(items: list[tuple[torch.Tensor | None, int, int]]) -> Batch:
    good = [item for item in items if item[0] is not None]
    unreadable = [index for image, _, index in items if image is None]
    if not good:
        none = torch.empty(0, dtype=torch.long)
        return Batch(torch.empty(0), none, none, unreadable)
    return Batch(
        images=torch.stack([image for image, _, _ in good]),
        labels=torch.tensor([label for _, label, _ in good], dtype=torch.long),
        indices=torch.tensor([index for _, _, index in good], dtype=torch.long),
        unreadable=unreadable,
    )


def batches(dataset: ImageFiles, batch_size: int, workers: int) -> Iterator[Batch]:
    """Batches in listing order, decoded in parallel with whatever consumes them.

    With ``workers > 0`` a DataLoader's worker processes decode; with 0 a background thread does,
    which still overlaps decoding with inference because PIL and torch release the GIL.
    """
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        prefetch_factor=2 if workers else None,
    )
    if workers:
        yield from loader
    else:
        yield from in_background(loader, depth=2)


_DONE = object()


def in_background(items: Iterable[Batch], depth: int) -> Iterator[Batch]:
    """Iterate ``items`` in a thread, at most ``depth`` ahead of the consumer (bounded, so no pile-up)."""
    ahead: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
            offer(_DONE)
        except BaseException as error:  # handed to the consumer, which re-raises it
            offer(error)

    thread = threading.Thread(target=produce, name="tome-eval-loader", daemon=True)
    thread.start()
    try:
        while (item := ahead.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
