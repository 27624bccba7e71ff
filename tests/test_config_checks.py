"""Every scalar key checked before any work, and torch's refusals of the optimizer or the loss named by key.

The same values go through compose + build (in process, and the inspector's command line) and through
`train.py` (slow): exit code 2, one line `gradwatch: <key>=...`, no traceback.
"""

import functools
import importlib.util
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import gradwatch.config.build as build_module
from gradwatch.config.build import build, check_one_step
from gradwatch.config.checks import RULES, check_config
from gradwatch.config.errors import ConfigError
from gradwatch.training.data import TensorBatches

from conftest import REPO, compose_cfg, read_tb, train, train_py

# (overrides, the key the one line names, what it says is allowed)
REFUSED = [
    (["telemetry.activations=abc"], "telemetry.activations", "true or false"),
    (["dataset.shuffle=abc"], "dataset.shuffle", "true or false"),
    (["summary.converge_relative=abc"], "summary.converge_relative", "true or false"),
    (["optimizer.lr=inf"], "optimizer.lr", "a finite number > 0"),
    (["seed=-1"], "seed", "an integer from 0 to 4294967295"),
    (["trainer.max_steps=abc"], "trainer.max_steps", "an integer >= 1, or -1 (no limit: trainer.max_epochs decides)"),
    (["trainer.max_steps=0"], "trainer.max_steps", "an integer >= 1, or -1 (no limit: trainer.max_epochs decides)"),
    (["threads=0"], "threads", "an integer >= 1"),
    (["dataset.noise=abc"], "dataset.noise", "a number >= 0"),
    (["optimizer.momentum=-1"], "optimizer.momentum", "a number >= 0"),
    (["optimizer.weight_decay=abc"], "optimizer.weight_decay", "a number >= 0"),
    (["log.flush_every_s=abc"], "log.flush_every_s", "a number >= 0"),
    (["optimizer=adam", "+optimizer.betas=[0.9]"], "optimizer.betas", "two numbers in [0, 1), e.g. [0.9, 0.999]"),
    (["loss._target_=torch.nn.NLLLoss"], "loss",
     "a loss of the model's output [64, 1] and the dataset's targets [64, 1] "
     "(RuntimeError: 0D or 1D target tensor expected, multi-target not supported)"),
]
IDS = [key if key != "optimizer.betas" else "adam-betas" for _, key, _ in REFUSED]
IDS[IDS.index("trainer.max_steps", IDS.index("trainer.max_steps") + 1)] = "max_steps-0"


def _value(overrides: list[str]) -> str:
    value = overrides[-1].partition("=")[2]
    return value.rsplit(".", 1)[-1] if "_target_" in overrides[-1] else value  # the loss's class name


@pytest.fixture(scope="module")
def inspect_script():
    spec = importlib.util.spec_from_file_location("inspect_backprop", REPO / "scripts" / "inspect_backprop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("overrides", "key", "allowed"), REFUSED, ids=IDS)
def test_build_refuses_naming_the_key(overrides, key, allowed):
    with pytest.raises(ConfigError) as info:
        build(compose_cfg(overrides))
    assert info.value.key == key
    assert str(info.value) == f"{key}={_value(overrides)} is not valid: allowed is {allowed}"


@pytest.mark.parametrize(("overrides", "key", "allowed"), REFUSED, ids=IDS)
def test_compose_and_build_print_one_line_and_exit_2(inspect_script, capsys, overrides, key, allowed):
    # scripts/inspect_backprop.py: compose + build, as train.py does before any training.
    assert inspect_script.main(overrides) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"gradwatch: {key}={_value(overrides)} is not valid: allowed is {allowed}"]
    assert "Traceback" not in captured.err


@pytest.mark.parametrize(("overrides", "key", "allowed"), REFUSED, ids=IDS)
def test_pipeline_stops_before_training_with_one_line(run_dir, capsys, overrides, key, allowed):
    with pytest.raises(SystemExit) as exit_info:
        train(overrides, run_dir)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"gradwatch: {key}={_value(overrides)} is not valid: allowed is {allowed}"]
    assert "Traceback" not in captured.out + captured.err
    assert not (run_dir / "tb").exists() and not (run_dir / "checkpoints").exists()


@pytest.fixture(scope="module")
def refused_by_train_py(tmp_path_factory) -> dict:
    """Every REFUSED case through `python train.py`, three at a time (their imports overlap)."""
    cwd = tmp_path_factory.mktemp("refused")
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {case_id: pool.submit(train_py, ["trainer.max_steps=1", *overrides], cwd)
                   for case_id, (overrides, _, _) in zip(IDS, REFUSED, strict=True)}
        return {case_id: future.result() for case_id, future in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize(("case_id", "overrides", "key", "allowed"),
                         [(i, *case) for i, case in zip(IDS, REFUSED, strict=True)], ids=IDS)
def test_train_py_prints_one_line_naming_the_key(refused_by_train_py, case_id, overrides, key, allowed):
    result = refused_by_train_py[case_id]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert lines == [f"gradwatch: {key}={_value(overrides)} is not valid: allowed is {allowed}"], result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("telemetry.enabled", 1, "true or false"),  # YAML 1 is an integer, not a boolean
    ("telemetry.every_n_steps", 0, "an integer >= 1"),
    ("telemetry.histograms_every_n_steps", 1.5, "an integer >= 0 (0: never)"),
    ("checkpoint.every_n_steps", "abc", "an integer >= 1"),
    ("log.flush_every_n_steps", 2.0, "an integer >= 1"),
    ("log.flush_every_s", float("nan"), "a finite number >= 0"),
    ("summary.converge_below", float("inf"), "a finite number >= 0"),
    ("trainer.max_epochs", -2, "null or an integer >= 1, or -1 (no limit: trainer.max_steps decides)"),
    ("trainer.max_epochs", 0, "null or an integer >= 1, or -1 (no limit: trainer.max_steps decides)"),
    ("threads", 1.0, "an integer >= 1"),
    ("trainer.gradient_clip_val", -1.0, "null (no clipping) or a number >= 0"),
    ("trainer.deterministic", "yes", "true, false or warn"),
    ("dataset.size", True, "an integer >= 1 (a dataset cannot be empty)"),
    ("dataset.batch_size", 0, "null (full batch) or an integer >= 1"),
    ("dataset.low", "abc", "a number"),
    ("dataset.train_fraction", 1.5, "a number > 0 and <= 1"),
    ("optimizer.lr", "abc", "a number > 0"),
    ("optimizer.eps", 0, "a number > 0"),
    ("optimizer.betas", [0.9, 1.0], "two numbers in [0, 1), e.g. [0.9, 0.999]"),
    ("optimizer.nesterov", "true", "true or false"),
    ("model.bias", "abc", "true or false"),
    ("model.in_features", 0, "null (follows the dataset) or an integer >= 1"),
])
def test_check_config_rules(key, value, allowed):
    cfg = OmegaConf.create({})
    OmegaConf.update(cfg, key, value)
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    assert (info.value.key, info.value.allowed) == (key, allowed)


def test_check_config_accepts_every_shipped_option():
    for overrides in (["telemetry=off"], ["optimizer=adam"], ["optimizer=adamw"], ["dataset=random_bce"],
                      ["dataset=line_2x", "model=linear"], ["experiment=seed_tiny_relu"],
                      ["trainer.max_steps=-1", "trainer.max_epochs=3", "dataset.seed=-5",
                       "trainer.deterministic=warn"]):
        check_config(compose_cfg(overrides))
    assert {"seed", "threads", "optimizer.lr", "dataset.shuffle", "trainer.max_steps"} <= set(RULES)


# ----------------------------------------------------------------------------- one step on copies


def _batches() -> TensorBatches:
    x = torch.linspace(-1, 1, 8).reshape(4, 2)
    return TensorBatches(x, x.sum(dim=1, keepdim=True), None, True, 0)


@pytest.mark.parametrize(("optimizer", "node", "key", "value"), [
    # what torch itself says, with the static checks bypassed
    (functools.partial(torch.optim.SGD, lr=0.1, momentum=-1), {"_target_": "torch.optim.SGD", "momentum": -1},
     "optimizer.momentum", -1),
    (functools.partial(torch.optim.Adam, lr=0.1, betas=[0.9, 1.5]),
     {"_target_": "torch.optim.Adam", "betas": [0.9, 1.5]}, "optimizer.betas", [0.9, 1.5]),
    (functools.partial(torch.optim.Adam, lr=0.1, eps=-1.0), {"_target_": "torch.optim.Adam", "eps": -1.0},
     "optimizer.eps", -1.0),
    (functools.partial(torch.optim.SGD, lr=0.1, nesterov=True), {"_target_": "torch.optim.SGD", "lr": 0.1,
                                                                  "nesterov": True}, "optimizer.nesterov", True),
    (functools.partial(torch.optim.SGD, lr=0.1, foo=1), {"_target_": "torch.optim.SGD", "foo": 1}, "optimizer.foo", 1),
    (functools.partial(torch.optim.SGD, lr="abc"), {"_target_": "torch.optim.SGD"}, "optimizer", "SGD"),
], ids=["momentum", "betas", "eps", "nesterov", "unknown-key", "unnamed"])
def test_one_step_names_the_optimizer_key_torch_refuses(optimizer, node, key, value):
    with pytest.raises(ConfigError) as info:
        check_one_step(nn.Sequential(nn.Linear(2, 1)), nn.MSELoss(), optimizer, _batches(), node)
    assert (info.value.key, info.value.value) == (key, value)
    assert info.value.allowed.startswith(f"a value {node['_target_'].rsplit('.', 1)[-1]} accepts (")


def test_one_step_names_the_loss():
    optimizer = functools.partial(torch.optim.SGD, lr=0.1)
    with pytest.raises(ConfigError) as info:
        check_one_step(nn.Sequential(nn.Linear(2, 1)), nn.MSELoss(reduction="none"), optimizer, _batches(), {})
    assert (info.value.key, info.value.value) == ("loss", "MSELoss")
    assert "grad can be implicitly created only for scalar outputs" in info.value.allowed


def test_one_step_leaves_model_batches_and_random_state_alone():
    model = nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.5), nn.Linear(3, 1))  # dropout draws random numbers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = TensorBatches(torch.randn(8, 2), torch.randn(8, 1), 2, True, 3)
    reference = TensorBatches(batches.x, batches.y, 2, True, 3)
    rng = torch.get_rng_state()
    check_one_step(model, nn.MSELoss(), functools.partial(torch.optim.SGD, lr=0.5), batches, {})
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    for _ in range(2):  # epoch 0, then epoch 1: the same order as batches never probed
        assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, reference, strict=True))


@pytest.mark.parametrize("overrides", [
    ["experiment=seed_learn_2x"],
    ["dataset.batch_size=16", "trainer.max_steps=12"],  # shuffled mini-batches over more than one epoch
], ids=["seed_learn_2x", "shuffled-batches"])
def test_trained_numbers_unchanged_by_the_one_step_check(tmp_path, monkeypatch, overrides):
    calls = []
    real = build_module.check_one_step
    monkeypatch.setattr(build_module, "check_one_step", lambda *args: calls.append(real(*args)))
    train(overrides, tmp_path / "checked")
    monkeypatch.setattr(build_module, "check_one_step", lambda *args: None)
    train(overrides, tmp_path / "unchecked")
    assert len(calls) == 1
    checked, unchecked = read_tb(tmp_path / "checked"), read_tb(tmp_path / "unchecked")
    assert checked["train/loss"] == unchecked["train/loss"] and len(checked["train/loss"]) > 10
    weights = [torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
               for run in ("checked", "unchecked")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_one_step_passes_a_closure_as_lightning_does():
    # LBFGS evaluates the loss itself, through the closure Lightning hands every optimizer.step.
    model = nn.Sequential(nn.Linear(2, 1))
    check_one_step(model, nn.MSELoss(), functools.partial(torch.optim.LBFGS, lr=0.5), _batches(),
                   {"_target_": "torch.optim.LBFGS"})
    assert all(p.grad is None for p in model.parameters())
