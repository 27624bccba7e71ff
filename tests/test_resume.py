"""Resume in-process: the resumed run logs the same steps and losses as one that never stopped."""

import pytest

from gradwatch.storage.record import read_run

from conftest import read_tb, train

STEPS = 12


@pytest.mark.parametrize(("batching", "stop"), [
    (["dataset.batch_size=16"], 6),  # mid-epoch
    (["dataset.batch_size=16"], 4),  # at an epoch boundary
    (["dataset.batch_size=20"], 5),  # a short last batch
    ([], 7),  # full batch
])
def test_resume_matches_uninterrupted_run(tmp_path, batching, stop):
    common = [*batching, "checkpoint.every_n_steps=1000"]
    train([*common, f"trainer.max_steps={STEPS}"], tmp_path / "straight")
    train([*common, f"trainer.max_steps={stop}"], tmp_path / "resumed")
    train([*common, f"trainer.max_steps={STEPS}", "ckpt_path=last"], tmp_path / "resumed")
    expected, losses = read_tb(tmp_path / "straight"), read_tb(tmp_path / "resumed")
    assert sorted(losses["train/loss"]) == list(range(STEPS))
    assert losses["train/loss"] == expected["train/loss"]
    assert losses["grad/0.weight/mean"] == expected["grad/0.weight/mean"]
    straight, resumed = read_run(tmp_path / "straight"), read_run(tmp_path / "resumed")
    for key in ("steps", "final_loss", "min_loss", "dead_fraction_final", "grad_global_norm_final"):
        assert resumed[key] == straight[key], key
