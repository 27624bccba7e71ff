"""Gradient and activation telemetry: every logged number against torch's own computation."""

import math

import numpy as np
import pytest
import torch

from gradwatch.config.build import build
from gradwatch.storage.parquet import read_metrics
from gradwatch.storage.record import read_run
from gradwatch.telemetry.stats import activation_stats, gradient_stats

from conftest import compose_cfg, read_layout, read_tb, train


def torch_stats(grad: torch.Tensor) -> dict[str, float]:
    """The reference: torch's per-parameter reductions, one at a time."""
    std = grad.std().item() if grad.numel() > 1 else 0.0
    return {
        "mean": grad.mean().item(),
        "std": std,
        "zero_fraction": (grad == 0).float().mean().item(),
        "norm": grad.norm().item(),
        "abs_max": grad.abs().max().item(),
        "nonfinite": float((~torch.isfinite(grad)).sum().item()),
    }


def _close(actual: float, expected: float) -> bool:
    return math.isclose(actual, expected, rel_tol=1e-5, abs_tol=1e-7)


CASES = [
    ["model=mlp", "model.hidden=[8,8]", "dataset=sum_x1_x2", "dataset.size=32"],
    ["model=mlp", "model.hidden=[5]", "model.activation=tanh", "dataset=line_2x", "dataset.noise=0.1"],
    ["model=linear", "dataset=sum_x1_x2"],
    # A 2-3-1 BCE net with a final ReLU, as in seed 004.
    ["model=mlp", "model.hidden=[3]", "model.output_activation=relu", "dataset=random_bce", "dataset.size=3",
     "loss=bce_with_logits"],
]


@pytest.mark.parametrize("overrides", CASES)
@pytest.mark.parametrize("seed", [0, 7])
def test_every_statistic_equals_torch_per_parameter(run_dir, overrides, seed):
    overrides = [*overrides, f"seed={seed}", "optimizer=adam", "optimizer.lr=0.05", "trainer.max_steps=2"]
    train(overrides, run_dir)
    scalars = read_tb(run_dir)
    # Replay the same config independently: gradients of step 0, then of step 1 after one Adam update.
    parts = build(compose_cfg(overrides))
    optimizer = parts.optimizer(parts.model.parameters())
    for step in (0, 1):
        optimizer.zero_grad()
        parts.loss_fn(parts.model(parts.x), parts.y).backward()
        squares = 0.0
        for name, param in parts.model.named_parameters():
            for stat, expected in torch_stats(param.grad).items():
                actual = scalars[f"grad/{name}/{stat}"][step]
                assert _close(actual, expected), (step, name, stat, actual, expected)
            squares += param.grad.double().pow(2).sum().item()
        assert _close(scalars["grad/global_norm"][step], math.sqrt(squares))
        optimizer.step()


def test_known_dead_units_give_exact_dead_fraction(run_dir):
    # x > 0 everywhere; units with weight -1 and bias -0.5 never fire, the other two always do.
    init = "{0.weight:[[1.0],[-1.0],[2.0],[-1.0]],0.bias:[0.0,-0.5,0.0,-0.5]}"
    train(["model=mlp", "model.hidden=[4]", f"model.init={init}", "dataset=line_2x", "trainer.max_steps=3",
           "optimizer.lr=0.001"], run_dir)
    scalars = read_tb(run_dir)
    for step in range(3):
        assert scalars["act/1/dead_fraction"][step] == 0.5
        assert scalars["act/1/zero_fraction"][step] == 0.5
        assert scalars["act/1/dead_fraction_epoch"][step] == 0.5
    assert read_run(run_dir)["dead_fraction_final"] == 0.5


def test_minibatch_epoch_dead_fraction_counts_units_that_never_fired(run_dir):
    # Unit 0 fires only for x > 3 (one sample of four): dead in most batches, alive over the epoch.
    init = "{0.weight:[[1.0],[-1.0]],0.bias:[-3.0,-0.5]}"
    train(["model=mlp", "model.hidden=[2]", f"model.init={init}", "dataset=line_2x", "dataset.batch_size=1",
           "dataset.shuffle=false", "trainer.max_steps=4", "optimizer.lr=1e-9"], run_dir)
    scalars = read_tb(run_dir)
    assert [scalars["act/1/dead_fraction"][s] for s in range(4)] == [1.0, 1.0, 1.0, 0.5]
    assert scalars["act/1/dead_fraction_epoch"] == {3: 0.5}  # written once, at the epoch's last step


def test_parquet_sink_holds_the_same_numbers_as_tensorboard(run_dir):
    train(["experiment=seed_bce_mlp", "trainer.max_steps=30", "log.flush_every_n_steps=7"], run_dir)
    scalars = read_tb(run_dir)
    metrics = read_metrics(run_dir)
    assert len(list((run_dir / "metrics").glob("part-*.parquet"))) == 5  # 4 periodic flushes and the last
    assert len(metrics) == sum(len(v) for k, v in scalars.items() if not k.startswith("hparams/"))
    for row in metrics.itertuples():
        assert np.float32(row.value) == np.float32(scalars[row.tag][row.step]), row


def test_every_n_steps_logs_only_on_those_steps(run_dir):
    train(["trainer.max_steps=10", "telemetry.every_n_steps=4"], run_dir)
    scalars = read_tb(run_dir)
    assert sorted(scalars["grad/0.weight/mean"]) == [0, 4, 8]
    assert sorted(scalars["act/1/dead_fraction"]) == [0, 4, 8]
    assert sorted(scalars["train/loss"]) == list(range(10))


def test_update_ratio_off_through_the_config_keeps_the_gradients_and_drops_the_ratios(tmp_path):
    common = ["trainer.max_steps=3", "model.hidden=[8]"]
    train(common, tmp_path / "on")
    train([*common, "telemetry.update_ratio=false"], tmp_path / "off")
    on, off = read_tb(tmp_path / "on"), read_tb(tmp_path / "off")
    assert {t for t in on if t.startswith("update/")} == {"update/0.weight/ratio", "update/0.bias/ratio",
                                                         "update/2.weight/ratio", "update/2.bias/ratio"}
    kept = {t: v for t, v in on.items() if not t.startswith(("update/", "hparams/"))}
    assert kept == {t: v for t, v in off.items() if not t.startswith("hparams/")} and "grad/0.weight/norm" in kept


def test_telemetry_off_logs_loss_and_lr_only(run_dir):
    train(["trainer.max_steps=5", "telemetry=off"], run_dir)
    scalars = read_tb(run_dir)
    assert {k for k in scalars if not k.startswith("hparams/")} == {"train/loss", "lr"}
    assert scalars["lr"][4] == pytest.approx(0.01)


def test_nonfinite_gradient_stops_run_as_diverged(run_dir):
    train(["model=linear", "dataset=line_2x", "optimizer.lr=1e38", "telemetry.on_nonfinite=stop",
           "trainer.max_steps=50"], run_dir)
    record = read_run(run_dir)
    assert record["status"] == "diverged"
    assert "0.weight" in record["error"] and record["diverged_at"] == record["steps"] - 1 < 50
    scalars = read_tb(run_dir)
    assert scalars["grad/0.weight/nonfinite"][record["diverged_at"]] == 1.0


def test_same_seed_same_curves_different_seed_different(tmp_path):
    curves = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        train([f"seed={seed}", "trainer.max_steps=25", "dataset.batch_size=16"], tmp_path / name)
        losses = read_tb(tmp_path / name)["train/loss"]
        curves.append([losses[s] for s in range(25)])
    assert curves[0] == curves[1]
    assert curves[0] != curves[2]


def test_stats_functions_match_torch_on_odd_tensors():
    grads = [torch.tensor([float("nan"), 1.0, 0.0]), torch.tensor([2.5]), torch.zeros(2, 3)]
    table = gradient_stats(grads)
    assert math.isnan(table[0, 0]) and table[0, 5] == 1.0  # NaN shows in mean, counted as nonfinite
    assert table[1].tolist() == [2.5, 0.0, 0.0, 2.5, 2.5, 0.0]
    assert table[2].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    rows, fired = activation_stats([torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]), torch.zeros(2, 1)])
    assert torch.allclose(rows, torch.tensor([[1 / 3, 4 / 6], [1.0, 1.0]], dtype=torch.float64), atol=1e-15)
    assert fired.tolist() == [False, True, True, False]


def test_custom_scalars_layout_names_categories_after_what_they_hold(run_dir):
    train(["model=mlp", "model.hidden=[3]", "trainer.max_steps=2"], run_dir)
    categories = read_layout(run_dir)
    assert list(categories) == ["training", "gradient flow", "dead ReLUs", "gradients of 0 (weight, bias)",
                                "gradients of 2 (weight, bias)"]
    assert categories["gradients of 0 (weight, bias)"]["gradient mean"] == [r"^grad/0\.weight/mean$",
                                                                            r"^grad/0\.bias/mean$"]
    assert categories["dead ReLUs"]["dead fraction (units silent for the whole batch), every ReLU layer"] == [
        r"^act/[^/]+/dead_fraction$"]


def test_histograms_every_n_steps(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(["model=linear", "trainer.max_steps=5", "telemetry.histograms_every_n_steps=2"], run_dir)
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"histograms": 0})
    acc.Reload()
    assert sorted(acc.Tags()["histograms"]) == ["grad/0.bias", "grad/0.weight"]
    assert [e.step for e in acc.Histograms("grad/0.weight")] == [0, 2, 4]
    assert acc.Histograms("grad/0.weight")[0].histogram_value.num == 2  # both weight elements


def test_steps_to_converge_absolute_and_relative():
    from gradwatch.summary.outcome import steps_to_converge

    steps, losses = [0, 1, 2, 3], [10.0, 2.0, 0.5, 0.05]
    assert steps_to_converge(steps, losses, 0.5) == 2
    assert steps_to_converge(steps, losses, 0.2, relative=True) == 1  # 0.2 x 10 = 2.0
    assert steps_to_converge(steps, losses, 0.001) is None
    assert steps_to_converge([], [], 1.0) is None
