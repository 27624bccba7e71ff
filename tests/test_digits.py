"""dataset=digits, loss=cross_entropy, train/accuracy and the digits study preset."""

from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from gradwatch.config.build import build
from gradwatch.config.errors import ConfigError
from gradwatch.storage.parquet import read_metrics
from gradwatch.telemetry.tags import ACCURACY
from gradwatch.training.data import digits
from gradwatch.training.module import GradwatchModule, accuracy

from conftest import compose_cfg, train

IMAGES, LABELS = load_digits(return_X_y=True)


def _rows(x: torch.Tensor, y: torch.Tensor) -> Counter:
    """(pixels 0..16, label) per image, as a multiset."""
    pixels = (x.double() * 16).round().to(torch.int64).tolist()
    return Counter((tuple(p), int(label)) for p, label in zip(pixels, y.argmax(dim=1).tolist(), strict=True))


def test_digits_splits_are_the_whole_set_scaled_to_unit_range():
    x_train, y_train = digits(seed=3)
    x_test, y_test = digits(split="test", seed=3)
    assert x_train.shape == (1438, 64) and y_train.shape == (1438, 10)  # round(0.8 * 1797)
    assert x_test.shape == (359, 64) and y_test.shape == (359, 10)
    assert x_train.dtype == y_train.dtype == torch.float32
    # Pixels are 0..16 in scikit-learn; divided by 16 they are exact multiples of 1/16 in [0, 1].
    both = torch.cat([x_train, x_test])
    assert both.min() == 0.0 and both.max() == 1.0
    assert torch.equal(both * 16, (both * 16).round())
    # Train and test together are every image exactly once (a partition), each with its own label.
    expected = Counter((tuple(int(v) for v in img), int(label)) for img, label in zip(IMAGES, LABELS, strict=True))
    assert _rows(x_train, y_train) + _rows(x_test, y_test) == expected


def test_digits_targets_are_one_hot():
    _, y = digits(train_fraction=1.0, seed=0)
    assert set(torch.unique(y).tolist()) == {0.0, 1.0}
    assert torch.equal(y.sum(dim=1), torch.ones(len(y)))
    assert sorted(Counter(y.argmax(dim=1).tolist()).items()) == sorted(Counter(LABELS.tolist()).items())


def test_digits_split_is_drawn_from_the_seed():
    assert all(torch.equal(a, b) for a, b in zip(digits(seed=5), digits(seed=5), strict=True))
    assert not torch.equal(digits(seed=5)[0], digits(seed=6)[0])
    assert len(digits(train_fraction=0.5, seed=0)[0]) == round(0.5 * 1797) == 898
    assert len(digits(train_fraction=1.0, seed=0)[0]) == 1797


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"train_fraction": 0.0}, "dataset.train_fraction=0.0 is not valid: allowed is a number > 0 and <= 1"),
    ({"train_fraction": 1.5}, "dataset.train_fraction=1.5 is not valid: allowed is a number > 0 and <= 1"),
    ({"split": "val"}, "dataset.split=val is not valid: allowed is train or test"),
    ({"split": "test", "train_fraction": 1.0}, "dataset.split=test is not valid: allowed is train (train_fraction"),
])
def test_digits_bad_arguments_name_the_key(kwargs, message):
    with pytest.raises(ConfigError) as err:
        digits(**kwargs)
    assert str(err.value).startswith(message)


def test_config_builds_a_64_in_10_out_classifier_on_batches_of_128():
    parts = build(compose_cfg(["dataset=digits", "loss=cross_entropy", "model=mlp", "seed=2"]))
    linears = [m for m in parts.model if isinstance(m, nn.Linear)]
    assert linears[0].in_features == 64 and linears[-1].out_features == 10
    assert isinstance(parts.loss_fn, nn.CrossEntropyLoss)
    assert parts.batches.batch_size == 128 and len(parts.batches) == 12  # ceil(1438 / 128)
    assert torch.equal(parts.x, digits(seed=2)[0])  # the data seed is the run's seed


def _count_correct(scores: list[list[float]], classes: list[int]) -> int:
    return sum(max(range(len(row)), key=row.__getitem__) == c for row, c in zip(scores, classes, strict=True))


def test_accuracy_by_hand():
    out = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [4.0, 0.0, 0.0]])
    classes = [0, 2, 2, 1]  # rows 0 and 2 are right
    one_hot = nn.functional.one_hot(torch.tensor(classes), 3).float()
    assert _count_correct(out.tolist(), classes) == 2
    for loss, target in ((nn.CrossEntropyLoss(), one_hot), (nn.CrossEntropyLoss(), torch.tensor(classes)),
                         (nn.NLLLoss(), torch.tensor(classes))):
        acc = accuracy(loss, out, target)
        assert acc.dim() == 0 and not acc.requires_grad and float(acc) == 0.5
    # Binary losses: each output is its own yes/no, at logit 0 (with logits) or probability 0.5.
    logits = torch.tensor([[0.3], [-1.0], [2.0], [-0.1], [0.0]])
    labels = torch.tensor([[1.0], [0.0], [0.0], [1.0], [0.0]])  # right, right, wrong, wrong, right
    assert float(accuracy(nn.BCEWithLogitsLoss(), logits, labels)) == pytest.approx(3 / 5)
    assert float(accuracy(nn.BCELoss(), torch.sigmoid(logits), labels)) == pytest.approx(3 / 5)
    assert accuracy(nn.MSELoss(), out, one_hot) is None


def test_training_step_sets_accuracy_only_for_classification():
    torch.manual_seed(0)
    x, y = digits(seed=0)
    net = nn.Sequential(nn.Linear(64, 10))
    module = GradwatchModule(net, nn.CrossEntropyLoss(), torch.optim.SGD)
    loss = module.training_step((x, y), 0)
    expected = _count_correct(net(x).tolist(), y.argmax(dim=1).tolist()) / len(x)
    assert set(module.step_metrics) == {ACCURACY} == {"train/accuracy"}
    assert float(module.step_metrics[ACCURACY]) == pytest.approx(expected, abs=1e-7)
    assert not module.step_metrics[ACCURACY].requires_grad and loss.requires_grad
    regression = GradwatchModule(nn.Sequential(nn.Linear(64, 10)), nn.MSELoss(), torch.optim.SGD)
    regression.training_step((x, y), 0)
    assert regression.step_metrics == {}


def test_digits_mlp_with_adam_reaches_train_accuracy_above_0_9(run_dir):
    # The command: python train.py dataset=digits loss=cross_entropy model=mlp optimizer=adam
    # optimizer.lr=0.01 (trainer.max_steps defaults to 200, within the 300 asked for), telemetry on.
    overrides = ["dataset=digits", "loss=cross_entropy", "model=mlp", "optimizer=adam", "optimizer.lr=0.01"]
    train(overrides, run_dir)
    cfg = compose_cfg(overrides)
    assert cfg.trainer.max_steps <= 300 and cfg.telemetry.enabled
    metrics = read_metrics(run_dir)
    assert metrics.step.max() == cfg.trainer.max_steps - 1
    assert {"grad/0.weight/norm", "act/1/dead_fraction"} <= set(metrics.tag)
    # Accuracy of the final weights over the whole train split, computed from the checkpoint.
    parts = build(cfg)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    parts.model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    with torch.no_grad():
        scores = parts.model(parts.x).tolist()
    train_accuracy = _count_correct(scores, parts.y.argmax(dim=1).tolist()) / len(parts.x)
    assert train_accuracy > 0.9
    # The logged per-batch accuracy, once the recorder writes step_metrics (telemetry branch).
    logged = metrics[metrics.tag == ACCURACY]
    if len(logged):
        assert len(logged) == cfg.trainer.max_steps and logged.value.iloc[-10:].mean() > 0.9
    # Held out (the test split of the same seed): the model generalises, not only memorises.
    x_test, y_test = digits(split="test", seed=cfg.seed)
    with torch.no_grad():
        test_scores = parts.model(x_test).tolist()
    assert _count_correct(test_scores, y_test.argmax(dim=1).tolist()) / len(x_test) > 0.85


def test_study_preset_composes_as_a_sweep_on_digits():
    cfg = compose_cfg(["experiment=study_digits_depth"])
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert set(cfg.hydra.sweeper.params) == {"model.hidden", "model.activation", "model.weight_init", "seed"}
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    basic = compose_cfg(["experiment=study_digits_depth", "hydra/launcher=basic"])
    assert basic.hydra.launcher._target_.endswith("BasicLauncher")
    assert cfg.dataset._target_ == "gradwatch.training.data.digits" and cfg.loss._target_ == "torch.nn.CrossEntropyLoss"
    # The deep sigmoid setting builds: 64 -> six hidden layers of 32 -> 10, sigmoid between.
    parts = build(compose_cfg(["experiment=study_digits_depth", "model.hidden=[32,32,32,32,32,32]",
                               "model.activation=sigmoid", "model.weight_init=kaiming_normal"]))
    layers = list(parts.model)
    assert [type(m) for m in layers] == [nn.Linear, nn.Sigmoid] * 6 + [nn.Linear]
    assert [m.out_features for m in layers if isinstance(m, nn.Linear)] == [32] * 6 + [10]
    # kaiming_normal (fan_in 32, ReLU gain): weight std sqrt(2/32) = 0.25.
    assert np.std(layers[2].weight.detach().numpy()) == pytest.approx(0.25, rel=0.15)
