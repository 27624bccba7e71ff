"""TensorBoard event files written in the caller's thread, in batches, from templates.

tensorboard's own writer builds a protobuf object per scalar, hands every event to a background
thread and computes each record's CRC32C in pure Python. scripts/bench_telemetry.py ("event
writer" lines) measures that against this file: the serialised Summary for a fixed list of tags
is built once, and each step only drops its float32 values into the template's slots; records
are written at flush with a C CRC32C (google-crc32c). The bytes are the protobuf encoding and the
TFRecord framing (length, masked CRC of length, data, masked CRC of data), so any TensorBoard
reader reads them; tests/test_events.py compares them with protobuf's own serialisation.

Other summaries (the custom-scalars layout, histograms, hparams, text) are rare: they are built
as protobuf `Summary` messages by the functions below and written through the same file.
"""

import os
import socket
import struct
import time
from collections.abc import Sequence
from pathlib import Path

import google_crc32c
import numpy as np
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

_MASK_DELTA = 0xA282EAD8


_BUFFER = 1 << 20  # the event file's write buffer: a flush's worth of steps, written by the OS at once


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C (the same value as tensorboard's pure-Python one)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class SummaryTemplate:
    """A `Summary` of `simple_value`s for fixed tags, serialised once with a 4-byte slot per value."""

    def __init__(self, names: Sequence[str]):
        parts, slots, position = [], [], 0
        for name in names:
            tag = name.encode()
            value = b"\x0a" + _varint(len(tag)) + tag + b"\x15"  # Value.tag (1), then simple_value (2)
            head = b"\x0a" + _varint(len(value) + 4) + value  # Summary.value (1)
            parts += [head, b"\0\0\0\0"]
            position += len(head)
            slots.append(position)
            position += 4
        self._buffer = np.frombuffer(b"".join(parts), dtype=np.uint8).copy()
        self._slots = (np.asarray(slots, dtype=np.int64)[:, None] + np.arange(4)).reshape(-1)

    def encode(self, values: np.ndarray) -> bytes:
        self._buffer[self._slots] = np.asarray(values, dtype="<f4").view(np.uint8)
        return self._buffer.tobytes()


def scalar_event(step: int, summary: bytes, wall_time: float) -> bytes:
    """An `Event` (wall_time 1, step 2, summary 5) around a serialised Summary."""
    step_field = b"\x10" + _varint(step) if step else b""  # proto3 leaves a zero step out
    return b"\x09" + struct.pack("<d", wall_time) + step_field + b"\x2a" + _varint(len(summary)) + summary


class EventFile:
    """One event file in `log_dir`; `write` buffers a step's scalars, `flush` writes.

    A sink (as `ParquetSink`): `write(step, names, values)`, `flush()`, `close()`;
    `add_summary(step, summary)` adds any other `Summary` message.

    `purge_from_step` (on resume) records a session restart at that step, so TensorBoard drops
    the events an interrupted run had logged at or after it.
    """

    def __init__(self, log_dir: Path, purge_from_step: int | None = None):
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.steps"
        self.path = log_dir / name
        # Each event goes into the file's buffer as a whole record when it is added (no list of
        # pending events to join and checksum at a flush: a deep net's 26 KB events cost ~10 us
        # less a step); `flush` hands the buffer to the OS. Kept open for the run, closed in close().
        self._file = open(self.path, "ab", buffering=_BUFFER)  # noqa: SIM115
        self._add(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        if purge_from_step is not None:
            restart = Event(wall_time=time.time(), step=purge_from_step,
                            session_log=SessionLog(status=SessionLog.START))
            self._add(restart.SerializeToString())
        # Templates by tag list (a step with telemetry and one without have different lists).
        self._templates: dict[tuple[str, ...], SummaryTemplate] = {}
        self._last_names: Sequence[str] | None = None
        self._last_template: SummaryTemplate | None = None

    def add_scalars(self, step: int, names: Sequence[str], values: np.ndarray) -> None:
        """One event holding every value of the step (stored as float32, as TensorBoard does)."""
        if names is self._last_names:  # the common case: the recorder passes the same tuple
            template = self._last_template
        else:
            template = self._templates.get(tuple(names))
            if template is None:
                template = self._templates[tuple(names)] = SummaryTemplate(names)
            self._last_names, self._last_template = names, template
        self._add(scalar_event(step, template.encode(values), time.time()))

    write = add_scalars

    def add_summary(self, step: int, summary: Summary) -> None:
        self._add(Event(wall_time=time.time(), step=step, summary=summary).SerializeToString())

    def _add(self, event: bytes) -> None:
        self._file.write(_record(event))

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()


# -- summaries other than a step's scalars -------------------------------------------------------
CUSTOM_SCALARS_TAG = "custom_scalars__config__"  # the tag TensorBoard's custom-scalars plugin reads


def layout_summary(layout: dict) -> Summary:
    """The custom-scalars layout `{category: {chart: ["Multiline", [tag regexes]] or
    ["Margin", [value, lower, upper]]}}` (the form `SummaryWriter.add_custom_scalars` takes)."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    categories = []
    for title, charts in layout.items():
        items = []
        for chart_title, (kind, spec) in charts.items():
            if kind == "Margin":
                value, lower, upper = spec
                content = layout_pb2.MarginChartContent(
                    series=[layout_pb2.MarginChartContent.Series(value=value, lower=lower, upper=upper)])
                items.append(layout_pb2.Chart(title=chart_title, margin=content))
            else:
                items.append(layout_pb2.Chart(title=chart_title, multiline=layout_pb2.MultilineChartContent(tag=spec)))
        categories.append(layout_pb2.Category(title=title, chart=items))
    tensor = TensorProto(dtype="DT_STRING", string_val=[layout_pb2.Layout(category=categories).SerializeToString()],
                         tensor_shape=TensorShapeProto())
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="custom_scalars"))
    return Summary(value=[Summary.Value(tag=CUSTOM_SCALARS_TAG, tensor=tensor, metadata=metadata)])


def _tensorflow_bins() -> np.ndarray:
    """TensorBoard's default bucket edges: +-1e-12 growing by 10% up to 1e20, and 0."""
    edges = 1e-12 * 1.1 ** np.arange(int(np.ceil(np.log(1e20 / 1e-12) / np.log(1.1))))
    return np.concatenate([-edges[::-1], [0.0], edges])


def histogram_summary(tag: str, values) -> Summary:
    """A histogram of `values` (a tensor or array), binned as `SummaryWriter.add_histogram` does."""
    from torch.utils.tensorboard.summary import histogram

    return histogram(tag, values, bins=_tensorflow_bins())


def text_summary(tag: str, text: str) -> Summary:
    from tensorboard.plugins.text.summary_v2 import text_pb

    return text_pb(tag, text)


def hparams_summaries(hparams: dict, metrics: list[str]) -> list[Summary]:
    """The HParams tab's experiment (hparam names, metric tags), session start (the values) and
    session end (success); the metrics themselves are scalars written at the same step."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2, summary_v2

    experiment = summary_v2.hparams_config_pb(hparams=[summary_v2.HParam(name) for name in hparams],
                                              metrics=[summary_v2.Metric(tag) for tag in metrics])
    start = summary_v2.hparams_pb(hparams)
    end_info = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
    end = Summary(value=[Summary.Value(
        tag=metadata.SESSION_END_INFO_TAG, tensor=metadata.NULL_TENSOR,
        metadata=metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(session_end_info=end_info)))])
    return [experiment, start, end]
