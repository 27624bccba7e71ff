"""The columnar sink: every logged scalar of a run as parquet parts, for pandas.

Layout: `<run dir>/metrics/part-<n>.parquet`, long format (`step`, `tag`, `value`). Each flush
writes one new part atomically, so a killed run keeps everything up to its last flush.
"""

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gradwatch.files import write_atomic

METRICS_DIR = "metrics"
_PART = "part-{:06d}.parquet"


class ParquetSink:
    """Buffers (step, tags, values) rows and writes them as one parquet part per flush.

    >>> sink = ParquetSink(tmp_path)             # doctest: +SKIP
    >>> sink.write(0, ("train/loss",), [25.0]); sink.flush()   # doctest: +SKIP
    """

    def __init__(self, run_dir: Path, purge_from_step: int | None = None):
        self.folder = Path(run_dir) / METRICS_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self._steps: list[int] = []
        self._tags: list[tuple[str, ...]] = []
        self._values: list[np.ndarray] = []
        if purge_from_step is not None:
            self._purge(purge_from_step)
        parts = _parts(self.folder)
        self._next_part = int(parts[-1].stem.split("-")[1]) + 1 if parts else 0

    def write(self, step: int, tags: tuple[str, ...], values: np.ndarray) -> None:
        self._steps.append(step)
        self._tags.append(tags)
        self._values.append(values)

    def flush(self) -> None:
        if not self._steps:
            return
        lengths = np.fromiter((len(t) for t in self._tags), dtype=np.int64, count=len(self._tags))
        steps = np.repeat(np.asarray(self._steps, dtype=np.int64), lengths)
        tags = [tag for group in self._tags for tag in group]
        values = np.concatenate(self._values).astype(np.float64, copy=False)
        table = pa.table({"step": steps, "tag": pa.array(tags).dictionary_encode(), "value": values})
        self._write_part(table)
        self._steps, self._tags, self._values = [], [], []

    def _write_part(self, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        write_atomic(self.folder / _PART.format(self._next_part), buffer.getvalue())
        self._next_part += 1

    def _purge(self, step: int) -> None:
        """On resume from `step`: drop rows at or after it (logged after the checkpoint), like
        TensorBoard's purge_step, so the resumed run neither duplicates nor loses a step."""
        old = _parts(self.folder)
        if not old:
            return
        kept = read_metrics(self.folder.parent)
        kept = kept[kept["step"] < step]
        self._next_part = int(old[-1].stem.split("-")[1]) + 1
        self._write_part(pa.Table.from_pandas(kept, preserve_index=False))
        for part in old:
            os.unlink(part)


def _parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet"))


def read_metrics(run_dir: Path) -> pd.DataFrame:
    """All scalars of a run as a long DataFrame (step, tag, value); unreadable parts are skipped.

    The skipped parts are listed in `df.attrs["unreadable"]`.
    """
    tables, unreadable = [], []
    for part in _parts(Path(run_dir) / METRICS_DIR):
        try:
            table = pq.read_table(part)
            tables.append(table.cast(pa.schema([("step", pa.int64()), ("tag", pa.string()), ("value", pa.float64())])))
        except (pa.ArrowException, OSError) as err:
            unreadable.append(f"{part.name}: {err}")
    if tables:
        frame = pa.concat_tables(tables).to_pandas()
    else:
        frame = pd.DataFrame({"step": pd.Series(dtype="int64"), "tag": pd.Series(dtype="str"),
                              "value": pd.Series(dtype="float64")})
    frame.attrs["unreadable"] = unreadable
    return frame
