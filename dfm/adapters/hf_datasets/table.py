"""Reading the table of a local Hugging Face dataset of prepared samples, file by file when one is unreadable.

``datasets`` maps every file of a dataset when it loads it, so a truncated or corrupt ``.arrow`` or
``.parquet`` file fails the whole load, before any row is read. :func:`load_table` then loads the files
one by one to name the bad ones: with ``strict`` the first raises
:class:`~dfm.ports.samples.BadSampleError`; otherwise each is skipped with a warning and the dataset is
the rows of the readable files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import pyarrow as pa
import structlog
from datasets.exceptions import DatasetsError

from dfm.ports.samples import META, TENSORS, BadSampleError

READ_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, pa.ArrowException, DatasetsError)
"""What ``datasets`` raises for a file it cannot read (pyarrow's errors, its own generation errors)."""
_log = structlog.get_logger(__name__)


def load_table(path: str | Path, *, strict: bool = True) -> datasets.Dataset:
    """The dataset at ``path``: a ``save_to_disk`` directory (its ``train`` split if it holds several),
    a parquet file, or a directory of parquet files; only the prepared-sample columns.

    Args:
        path: Where the dataset is.
        strict: Raise on a file that cannot be read; ``False`` skips it with a warning.

    Raises:
        BadSampleError: (a ``ValueError``) With ``strict``, naming a truncated or corrupt file.
        ValueError: Nothing readable there, or the columns are not those of :mod:`dfm.ports.samples`.
    """
    return read_table(path, strict=strict)[0]


def read_table(path: str | Path, *, strict: bool) -> tuple[datasets.Dataset, list[str]]:
    """:func:`load_table` and the files it skipped (empty with ``strict``)."""
    path = Path(path)
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise ValueError(f"{path}: a DatasetDict without a 'train' split (has {sorted(splits)})")
        path = path / "train"
    if (path / "state.json").is_file():
        state = json.loads((path / "state.json").read_text())
        files = [path / entry["filename"] for entry in state.get("_data_files", [])]
        table, skipped = _load(path, files, lambda: datasets.load_from_disk(str(path)), _arrow_file, strict)
    else:
        files = [path] if path.suffix == ".parquet" and path.is_file() else sorted(path.glob("**/*.parquet"))
        if not files:
            raise ValueError(
                f"{path} is neither a dataset written by `save_to_disk` nor parquet files; convert prepared "
                "shards with dfm.adapters.hf_datasets.webdataset_to_hf"
            )
        table, skipped = _load(path, files, lambda: _parquet(files), lambda f: _parquet([f]), strict)
    missing = [c for c in (TENSORS, META) if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: lacks the columns {missing} of a prepared dfm data set (has {table.column_names})")
    if len(table) == 0:
        raise ValueError(f"{path}: the dataset has no rows")
    return table.select_columns([TENSORS, META]), skipped


def _load(
    path: Path,
    files: Sequence[Path],
    whole: Callable[[], datasets.Dataset],
    one: Callable[[Path], datasets.Dataset],
    strict: bool,
) -> tuple[datasets.Dataset, list[str]]:
    """All ``files`` at once; if that fails, file by file, raising on (strict) or skipping the unreadable ones."""
    try:
        return whole(), []
    except READ_ERRORS as exc:
        failure = exc
    parts, skipped = [], []
    for file in files:
        try:
            parts.append(one(file))
        except READ_ERRORS as exc:
            error = BadSampleError(
                f"{file} cannot be read ({_describe(exc)}); the file is truncated or "
                "corrupt: write the dataset again, or train without the file with data.strict=false"
            )
            if strict:
                raise error from None
            _log.warning("unreadable file skipped", file=str(file), reason=str(error))
            skipped.append(str(file))
    if not skipped:  # every file reads alone: the failure is about the whole
        raise ValueError(f"{path} cannot be read: {_describe(failure)}") from None
    if not parts:
        raise ValueError(f"{path}: none of its {len(files)} files can be read; write the dataset again")
    return datasets.concatenate_datasets(parts), skipped


def _arrow_file(file: Path) -> datasets.Dataset:
    return datasets.Dataset.from_file(str(file))


def _parquet(files: Sequence[Path]) -> datasets.Dataset:
    return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")


def _describe(exc: BaseException) -> str:
    """``Type: first line`` of the error at the root of ``exc``'s causes (``datasets`` wraps pyarrow's)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip() or repr(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0]}"
