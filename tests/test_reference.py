"""REFERENCE.md seeds 000-004: the tutorials' numbers, through config -> model -> data -> Lightning -> files."""

import math

import pytest
import torch

from gradwatch.config.build import build
from gradwatch.storage.record import read_run

from conftest import compose_cfg, read_tb, train

EXACT = 1e-6


def _approx(value: float, expected: float) -> bool:
    return math.isclose(value, expected, rel_tol=1e-3)


@pytest.mark.parametrize(
    ("experiment", "loss", "grads", "dead"),
    [
        ("seed_tiny_relu", 25.0, {"2.weight": 20.0, "2.bias": 10.0, "0.weight": 30.0, "0.bias": 30.0}, 0.0),
        ("seed_relu_off", 1.0, {"2.weight": 0.0, "2.bias": -2.0, "0.weight": 0.0, "0.bias": 0.0}, 1.0),
    ],
)
def test_seed000_forward_backward_exact(run_dir, experiment, loss, grads, dead):
    train([f"experiment={experiment}", "trainer.max_steps=2"], run_dir)
    scalars = read_tb(run_dir)
    assert abs(scalars["train/loss"][0] - loss) <= EXACT
    for param, grad in grads.items():
        assert abs(scalars[f"grad/{param}/mean"][0] - grad) <= EXACT, param
    assert scalars["act/1/dead_fraction"][0] == dead
    if experiment == "seed_relu_off":
        # The dead unit blocks every gradient of the first layer.
        assert scalars["grad/0.weight/zero_fraction"][0] == 1.0
        assert scalars["grad/0.bias/zero_fraction"][0] == 1.0


@pytest.mark.parametrize(
    ("experiment", "loss0", "dw", "db", "loss1"),
    [
        ("seed_sum_regression", 60.11, [-52.88, -66.90], -14.02, 8.638),
        ("seed_sum_regression_raw", 140.14, [-80.87, -101.62], -20.75, 20.92),
    ],
)
def test_seed001_sum_regression_one_sgd_step(run_dir, experiment, loss0, dw, db, loss1):
    # Gradients element by element, from the objects the config builds.
    parts = build(compose_cfg([f"experiment={experiment}"]))
    parts.loss_fn(parts.model(parts.x), parts.y).backward()
    weight, bias = parts.model[0].weight.grad.reshape(-1).tolist(), parts.model[0].bias.grad.item()
    assert all(_approx(g, e) for g, e in zip(weight, dw, strict=True)), weight
    assert _approx(bias, db)
    # The loss before and after one SGD step, as the training run logged it.
    train([f"experiment={experiment}", "trainer.max_steps=2"], run_dir)
    losses = read_tb(run_dir)["train/loss"]
    assert _approx(losses[0], loss0) and _approx(losses[1], loss1), losses
    assert abs(read_tb(run_dir)["grad/0.bias/mean"][0] - bias) <= EXACT


@pytest.mark.parametrize(("seed", "w", "b"), [(1, 1.983, 0.049), (0, 1.680, 0.941)])
def test_seed002_learn_2x_weight_moves_toward_2(run_dir, seed, w, b):
    train(["experiment=seed_learn_2x", f"seed={seed}"], run_dir)
    losses = read_tb(run_dir)["train/loss"]
    curve = [losses[s] for s in range(50)]
    assert len(losses) == 50
    assert all(later < earlier for earlier, later in zip(curve, curve[1:], strict=False)), "loss must fall every step"
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert math.isclose(state["model.0.weight"].item(), w, abs_tol=1e-3)
    assert math.isclose(state["model.0.bias"].item(), b, abs_tol=1e-3)
    assert read_run(run_dir)["steps"] == 50


@pytest.mark.parametrize("activation", [None, "tanh", "sigmoid"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seed003_closed_form_chain_rule(activation, seed):
    """dE/dw = 2(sigma - y) x f'(sigma) and dE/db = 2(sigma - y) f'(sigma), mean over samples."""
    gen = torch.Generator().manual_seed(seed)
    xs, ys = torch.randn(5, generator=gen).tolist(), torch.randn(5, generator=gen).tolist()
    model = "model=linear" if activation is None else "model=mlp"
    extra = [] if activation is None else ["model.hidden=[]", f"model.output_activation={activation}"]
    parts = build(compose_cfg([model, *extra, "dataset=points", f"dataset.x={xs}", f"dataset.y={ys}",
                               f"seed={seed}"]))
    net = parts.model.double()
    x, y = parts.x.double(), parts.y.double()
    parts.loss_fn(net(x), y).backward()
    w, b = net[0].weight.item(), net[0].bias.item()
    sigma = w * x + b
    out, fprime = {
        None: (sigma, torch.ones_like(sigma)),
        "tanh": (torch.tanh(sigma), 1 - torch.tanh(sigma) ** 2),
        "sigmoid": (torch.sigmoid(sigma), torch.sigmoid(sigma) * (1 - torch.sigmoid(sigma))),
    }[activation]
    dw = (2 * (out - y) * fprime * x).mean().item()
    db = (2 * (out - y) * fprime).mean().item()
    assert math.isclose(net[0].weight.grad.item(), dw, rel_tol=1e-12, abs_tol=1e-12)
    assert math.isclose(net[0].bias.grad.item(), db, rel_tol=1e-12, abs_tol=1e-12)


def test_seed004_bce_mlp_one_element_std_is_zero(run_dir):
    train(["experiment=seed_bce_mlp", "trainer.max_steps=1"], run_dir)
    scalars = read_tb(run_dir)
    assert scalars["grad/2.bias/std"][0] == 0.0  # torch's Tensor.std() would give NaN here
    parts = build(compose_cfg(["experiment=seed_bce_mlp"]))
    assert parts.y.reshape(-1).tolist() == [0.0, 1.0, 0.0]
    parts.loss_fn(parts.model(parts.x), parts.y).backward()
    assert math.isnan(parts.model[2].bias.grad.std().item())
    assert abs(scalars["grad/2.bias/mean"][0] - parts.model[2].bias.grad.item()) <= EXACT
