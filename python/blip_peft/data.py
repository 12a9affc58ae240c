"""Image-caption datasets: the `imagefolder` convention (`metadata.jsonl` with `file_name` and `text`), JSONL and
CSV files, and adapters for Hugging Face `datasets.Dataset` and plain sequences of `{"image", "text"}` dicts."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from blip_peft._convert import fspath


class ImageCaptionDataset(Sequence[dict[str, Any]]):
    """A sequence of `{"image": <path | PIL image | bytes | array>, "text": str}` items."""

    def __init__(self, items: Sequence[dict[str, Any]]) -> None:
        self._items = list(items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return ImageCaptionDataset(self._items[index])
        return self._items[index]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._items)

    def __repr__(self) -> str:
        return f"ImageCaptionDataset({len(self)} items)"

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike[str], text_column: str = "text", fields: Sequence[str] | None = None
    ) -> ImageCaptionDataset:
        """An `imagefolder` dataset: `folder/metadata.jsonl` (or `.csv`) lists `file_name` and the caption.

        `fields`: the fields each row holds besides its image, kept under their names, instead of the caption
        alone (`text_column`, kept as "text"): ``("question", "answer")`` for VQA rows."""
        root = fspath(folder, "folder")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"dataset folder not found: {root!r}")
        for name in ("metadata.jsonl", "metadata.csv"):
            path = os.path.join(root, name)
            if os.path.isfile(path):
                reader = cls.from_jsonl if name.endswith(".jsonl") else cls.from_csv
                return reader(path, text_column=text_column, fields=fields)
        raise FileNotFoundError(
            f"{root!r} has no metadata.jsonl or metadata.csv; the imagefolder convention needs one, with a "
            "`file_name` and a `text` field per image"
        )

    @classmethod
    def from_jsonl(
        cls,
        path: str | os.PathLike[str],
        text_column: str = "text",
        image_column: str = "file_name",
        fields: Sequence[str] | None = None,
    ) -> ImageCaptionDataset:
        """One JSON object per line with the image file (relative to the file's folder) and its caption (or
        the `fields` given, as in `from_folder`)."""
        file = _existing_file(path, "JSONL")
        rows = []
        with open(file, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{file}, line {number}: not valid JSON ({e})") from None
        return cls._from_rows(rows, os.path.dirname(file), file, text_column, image_column, fields)

    @classmethod
    def from_csv(
        cls,
        path: str | os.PathLike[str],
        text_column: str = "text",
        image_column: str = "file_name",
        fields: Sequence[str] | None = None,
    ) -> ImageCaptionDataset:
        """A CSV file with a header naming the image-file and caption columns (or the `fields` given, as in
        `from_folder`)."""
        file = _existing_file(path, "CSV")
        with open(file, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        return cls._from_rows(rows, os.path.dirname(file), file, text_column, image_column, fields)

    @classmethod
    def _from_rows(
        cls,
        rows: list[Any],
        base: str,
        file: str,
        text_column: str,
        image_column: str,
        fields: Sequence[str] | None = None,
    ) -> ImageCaptionDataset:
        if isinstance(fields, str):
            raise TypeError(f"fields must be a list of field names, got the string {fields!r}")
        kept = {text_column: "text"} if fields is None else {f: f for f in fields}
        items = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValueError(f"{file}: row {i} is not an object")
            for column in (image_column, *kept):
                if column not in row:
                    raise ValueError(f"{file}: row {i} has no {column!r} field (fields: {sorted(row)})")
            image = row[image_column]
            if not isinstance(image, str):
                raise ValueError(f"{file}: row {i}: {image_column!r} must be a file name")
            items.append({"image": os.path.join(base, image), **{name: row[c] for c, name in kept.items()}})
        return cls(items)


def _existing_file(path: str | os.PathLike[str], kind: str) -> str:
    """`path` as a string, or FileNotFoundError naming the kind of file that was expected there."""
    file = fspath(path, "path")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{kind} file not found: {file!r}")
    return file


def as_items(dataset: Any, image_column: str = "image", text_column: str = "text") -> Sequence[Any]:
    """Any supported dataset as an indexable sequence of `(image, text)` pairs, checking the columns."""
    if dataset is None:
        raise TypeError("a dataset is required")
    column_names = getattr(dataset, "column_names", None)
    if column_names is not None:  # a datasets.Dataset
        for column in (image_column, text_column):
            if column not in column_names:
                raise ValueError(f"the dataset has no {column!r} column (columns: {column_names})")
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(f"a dataset must be a sequence of {{'image', 'text'}} items, got {type(dataset).__name__}")
    return _Pairs(dataset, image_column, text_column)


class _Pairs(Sequence[tuple[Any, Any]]):
    def __init__(self, dataset: Any, image_column: str, text_column: str) -> None:
        self._dataset = dataset
        self._image = image_column
        self._text = text_column

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index: Any) -> Any:
        item = self._dataset[index]
        if not isinstance(item, dict):
            raise TypeError(f"dataset item {index} must be a dict with {self._image!r} and {self._text!r}")
        for column in (self._image, self._text):
            if column not in item:
                raise ValueError(f"dataset item {index} has no {column!r} field (fields: {sorted(item)})")
        return item[self._image], item[self._text]
