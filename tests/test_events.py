"""gradwatch's event writer against protobuf's own serialisation and TensorBoard's reader."""

import math
import re

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tensorboard_crc

from gradwatch.storage.events import EventFile, SummaryTemplate, masked_crc32c, scalar_event

NAMES = ("train/loss", "grad/0.weight/mean", "act/1/dead_fraction", "x" * 200)


@pytest.mark.parametrize("step", [0, 1, 300, 2**40])
def test_event_bytes_equal_protobuf_serialisation(step):
    values = np.array([25.0, -0.5, float("nan"), float("inf")])
    ours = scalar_event(step, SummaryTemplate(NAMES).encode(values), wall_time=1234.5)
    summary = Summary(value=[Summary.Value(tag=n, simple_value=v) for n, v in zip(NAMES, values, strict=True)])
    assert ours == Event(wall_time=1234.5, step=step, summary=summary).SerializeToString()


@pytest.mark.parametrize("size", [0, 1, 7, 100, 5000])
def test_crc_equals_tensorboards(size):
    data = np.random.default_rng(size).bytes(size)
    assert masked_crc32c(data) == tensorboard_crc(data)


def test_tensorboard_reads_every_event_back(tmp_path):
    events = EventFile(tmp_path)
    other = ("train/loss", "lr")
    for step in range(50):
        if step % 10 == 0:
            events.add_scalars(step, NAMES, np.array([step, -step, 0.5, 1.0]))
        else:
            events.add_scalars(step, other, np.array([step, 0.1]))
    events.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(50))
    assert [e.value for e in acc.Scalars("train/loss")] == [float(s) for s in range(50)]
    assert [e.step for e in acc.Scalars("grad/0.weight/mean")] == [0, 10, 20, 30, 40]
    assert all(math.isclose(e.value, 0.1, rel_tol=1e-7) for e in acc.Scalars("lr"))


def test_layout_has_one_gradient_flow_chart_with_every_weights_norm(tmp_path):
    from conftest import read_layout, read_tb, train

    train(["model=mlp", "model.hidden=[4,4,4]", "trainer.max_steps=3"], tmp_path)
    charts = read_layout(tmp_path)
    logged = read_tb(tmp_path)

    def drawn(category: str, chart: str) -> list[str]:
        """The logged tags a chart draws: TensorBoard searches each of its regexes in every tag."""
        return sorted(tag for tag in logged if any(re.search(r, tag) for r in charts[category][chart]))

    # Linear, ReLU, Linear, ...: the four weights, and nothing else.
    assert drawn("gradient flow", "gradient norm of every weight") == [f"grad/{i}.weight/norm" for i in (0, 2, 4, 6)]
    assert drawn("gradient flow", "update ratio of every weight") == [f"update/{i}.weight/ratio" for i in (0, 2, 4, 6)]
    assert drawn("dead ReLUs", "dead fraction (units silent for the whole batch), every ReLU layer") == [
        f"act/{i}/dead_fraction" for i in (1, 3, 5)]  # not dead_fraction_epoch
    assert drawn("gradients of 0 (weight, bias)", "gradient norm") == ["grad/0.bias/norm", "grad/0.weight/norm"]
