"""The columnar sink: every logged scalar of a run as parquet parts, for pandas.

Layout: `<run dir>/metrics/part-<n>.parquet` (`RunPaths.metrics`), long format (`step`, `tag`,
`value`). Each flush writes one new part atomically, so a killed run keeps everything up to its
last flush.
"""

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gradwatch.storage.files import write_atomic
from gradwatch.storage.names import JoinedNames
from gradwatch.storage.paths import RunPaths

_PART = "part-{:06d}.parquet"


class ParquetSink:
    """Buffers (step, tags, values) rows and writes them as one parquet part per flush into `folder`.

    A sink (as `EventFile`): `write(step, names, values)`, `flush()`, `close()`.

    >>> sink = ParquetSink(RunPaths(tmp_path).metrics)             # doctest: +SKIP
    >>> sink.write(0, ("train/loss",), [25.0]); sink.flush()   # doctest: +SKIP
    """

    def __init__(self, folder: Path, purge_from_step: int | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._steps: list[int] = []
        self._tags: list[tuple[str, ...]] = []
        self._values: list[np.ndarray] = []
        # Per combination of tag tuples in a part (by identity: the recorder passes the same
        # tuple objects step after step): the part's dictionary and each tuple's codes in it.
        self._codes = JoinedNames()
        if purge_from_step is not None:
            self._purge(purge_from_step)
        parts = _parts(self.folder)
        self._next_part = int(parts[-1].stem.split("-")[1]) + 1 if parts else 0

    def write(self, step: int, names: tuple[str, ...], values: np.ndarray) -> None:
        self._steps.append(step)
        self._tags.append(names)
        self._values.append(values)

    def close(self) -> None:
        self.flush()

    def flush(self) -> None:
        if not self._steps:
            return
        dictionary, codes = self._dictionary(self._tags)
        lengths = np.fromiter((len(t) for t in self._tags), dtype=np.int64, count=len(self._tags))
        steps = np.repeat(np.asarray(self._steps, dtype=np.int64), lengths)
        indices = pa.array(np.concatenate([codes[id(names)] for names in self._tags]), type=pa.int32())
        values = np.concatenate(self._values).astype(np.float64, copy=False)
        table = pa.table({"step": steps, "tag": pa.DictionaryArray.from_arrays(indices, dictionary), "value": values})
        self._write_part(table)
        self._steps, self._tags, self._values = [], [], []

    def _dictionary(self, tag_groups: list[tuple[str, ...]]) -> tuple[pa.Array, dict[int, np.ndarray]]:
        """The distinct tags of a part, and per tag tuple its codes into them (cached by the
        tuples' identities, `JoinedNames`: encoding every row's tag costs ~10 ms per flush of a
        deep net's ~700 tags x 60 steps)."""
        distinct = list({id(names): names for names in tag_groups}.values())
        return self._codes.cached(distinct, _codes)

    def _write_part(self, table: pa.Table) -> None:
        buffer = io.BytesIO()
        # Statistics of the step column only: those of ~700 tags and their values cost more
        # than the rest of the write, and nothing filters on them. A dictionary for the tags and
        # steps only: hashing ~70,000 distinct float values into one took 2/3 of a deep net's
        # flush (8.5 ms against 2.4 ms per 100 steps of 700 tags), and made the file larger.
        pq.write_table(table, buffer, write_statistics=["step"], use_dictionary=["tag", "step"])
        write_atomic(self.folder / _PART.format(self._next_part), buffer.getvalue())
        self._next_part += 1

    def _purge(self, step: int) -> None:
        """On resume from `step`: drop rows at or after it (logged after the checkpoint), like
        TensorBoard's purge_step, so the resumed run neither duplicates nor loses a step."""
        old = _parts(self.folder)
        if not old:
            return
        kept = _read_folder(self.folder)[0]
        kept = kept.filter(pc.less(kept.column("step"), step))
        self._next_part = int(old[-1].stem.split("-")[1]) + 1
        self._write_part(kept)
        for part in old:
            os.unlink(part)


def _codes(groups: tuple[tuple[str, ...], ...]) -> tuple[pa.Array, dict[int, np.ndarray]]:
    """The distinct tags of `groups` as a dictionary, and each group's codes into it, by the
    group's identity."""
    index: dict[str, int] = {}
    for names in groups:
        for tag in names:
            index.setdefault(tag, len(index))
    codes = {id(names): np.fromiter((index[t] for t in names), dtype=np.int32, count=len(names)) for names in groups}
    return pa.array(list(index), type=pa.string()), codes


def _parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet"))


_SCHEMA = pa.schema([("step", pa.int64()), ("tag", pa.dictionary(pa.int32(), pa.string())), ("value", pa.float64())])


def _keep_rows(table: pa.Table, keep: Callable[[str], bool]) -> pa.Table:
    """Rows whose tag passes `keep`, testing each distinct tag once (not each of the rows)."""
    tags = table.column("tag").combine_chunks()
    if not pa.types.is_dictionary(tags.type):
        tags = tags.dictionary_encode()
    wanted = pa.array([keep(tag) for tag in tags.dictionary.to_pylist()], type=pa.bool_())
    return table.filter(pc.take(wanted, tags.indices))


@dataclass
class Scalars:
    """A run's scalars as arrays (step, tag code, value) and the tag of each code."""

    step: np.ndarray
    code: np.ndarray
    value: np.ndarray
    names: list[str]
    unreadable: list[str]

    def __len__(self) -> int:
        return len(self.step)

    def frame(self) -> pd.DataFrame:
        """The long DataFrame (step, tag, value), `tag` categorical in first-appearance order."""
        tag = pd.Categorical.from_codes(self.code, categories=pd.Index(self.names, dtype=object)) \
            if len(self.names) else pd.Categorical([])
        return pd.DataFrame({"step": self.step, "tag": tag, "value": self.value})

    def mask(self, predicate: Callable[[str], bool]) -> np.ndarray:
        """Rows whose tag passes `predicate`, testing each distinct tag once."""
        wanted = np.fromiter((predicate(n) for n in self.names), dtype=bool, count=len(self.names))
        return wanted[self.code] if len(self.names) else np.zeros(len(self), dtype=bool)

    def series(self, tag: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one tag in step order; a step written twice keeps its last value."""
        rows = np.flatnonzero(self.mask(lambda n: n == tag))
        steps = self.step[rows]
        order = np.argsort(steps, kind="stable")
        steps, values = steps[order], self.value[rows][order]
        last = np.append(steps[1:] != steps[:-1], True) if len(steps) else np.zeros(0, dtype=bool)
        return steps[last], values[last]


def _read_folder(folder: Path, keep: Callable[[str], bool] | None = None) -> tuple[pa.Table, list[str]]:
    """Every readable part of `folder` as one table, and the parts that could not be read."""
    tables, unreadable = [], []
    for part in _parts(folder):
        try:
            table = pq.read_table(part)
            if keep is not None:
                table = _keep_rows(table, keep)
            tables.append(table.cast(_SCHEMA))
        except (pa.ArrowException, OSError, ValueError) as err:
            unreadable.append(f"{part.name}: {err}")
    return (pa.concat_tables(tables).unify_dictionaries() if tables else _SCHEMA.empty_table()), unreadable


def read_scalars(run_dir: Path, keep: Callable[[str], bool] | None = None) -> Scalars:
    """The scalars of a run (all, or those whose tag passes `keep`); unreadable parts are skipped
    and listed in `unreadable`."""
    table, unreadable = _read_folder(RunPaths(run_dir).metrics, keep)
    tags = table.column("tag").combine_chunks()
    if isinstance(tags, pa.ChunkedArray):  # an empty table
        tags = pa.DictionaryArray.from_arrays(pa.array([], pa.int32()), pa.array([], pa.string()))
    return Scalars(
        step=table.column("step").to_numpy(),
        code=tags.indices.to_numpy(zero_copy_only=False),
        value=table.column("value").to_numpy(),
        names=tags.dictionary.to_pylist(),
        unreadable=unreadable,
    )


def read_metrics(run_dir: Path, keep: Callable[[str], bool] | None = None) -> pd.DataFrame:
    """The scalars of a run as a long DataFrame (step, tag, value), `tag` categorical.
    Unreadable parts are skipped and listed in `df.attrs["unreadable"]`.
    """
    scalars = read_scalars(run_dir, keep)
    frame = scalars.frame()
    frame.attrs["unreadable"] = scalars.unreadable
    return frame
