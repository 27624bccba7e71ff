"""Backprop inspector: the seed tutorials 000 and 003 through the config path (compose, build, batch)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pydot
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

import gradwatch  # noqa: F401  (registers the config's resolvers)
from gradwatch.config.build import build
from gradwatch.inspect.checks import chain_rule_check, gradient_check, seed003_closed_form
from gradwatch.inspect.inspector import inspect_backprop
from gradwatch.inspect.records import SMALL, tensor_view
from gradwatch.inspect.rendering import render_dot, render_text

REPO = Path(__file__).resolve().parents[1]
EXACT = 1e-6
SCRIPT = "scripts/inspect_backprop.py"
JSON_COMMAND = [sys.executable, SCRIPT, "experiment=seed_tiny_relu", "--format", "json"]
TRACE_VALUES = [1, 2, 2, 2, 3, 6, 1, 6, 1, 2, 3, 2, 1, 2]
TINY_GRADS = {"2.weight": 20, "2.bias": 10, "0.weight": 30, "0.bias": 30}
SIGMOID_NEURON = ("model=mlp", "model.hidden=[]", "model.output_activation=sigmoid")


@pytest.fixture(scope="module", autouse=True)
def json_run():
    # Started before the first test and read by the last one, so the script's seconds of imports
    # (torch, Lightning) overlap the in-process tests instead of adding to them.
    proc = subprocess.Popen(JSON_COMMAND, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("inspect_backprop", REPO / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def first_batch(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    parts = build(cfg)
    x, y = next(iter(parts.batches))
    return parts, x, y


def inspected(*overrides: str, **kwargs):
    parts, x, y = first_batch(*overrides)
    return inspect_backprop(parts.model, parts.loss_fn, x, y, **kwargs)


def scalar(view: dict) -> float:
    value = view["values"]
    while isinstance(value, list):
        assert len(value) == 1, view
        value = value[0]
    return value


def close(actual: dict[str, float], expected: dict[str, float]) -> bool:
    return actual.keys() == expected.keys() and all(abs(actual[k] - expected[k]) <= EXACT for k in expected)


# ----------------------------------------------------------------------------- seed 000


def test_tiny_relu_forward_values_and_grad_fns():
    record = inspected("experiment=seed_tiny_relu")
    assert [s.label for s in record.forward] == ["z1", "h1", "y_pred", "loss"]
    forward = {s.label: scalar(s.tensor) for s in record.forward}
    assert close(forward, {"z1": 2, "h1": 2, "y_pred": 6, "loss": 25})
    assert [s.grad_fn for s in record.forward] == [
        "AddmmBackward0", "ReluBackward0", "AddmmBackward0", "MseLossBackward0"
    ]
    assert [s.module for s in record.forward] == ["0", "1", "2", "loss"]
    assert abs(record.loss - 25) <= EXACT


def test_tiny_relu_gradients():
    record = inspected("experiment=seed_tiny_relu")
    grads = {g.name: scalar(g.grad) for g in record.gradients}
    assert close(grads, TINY_GRADS)


def test_tiny_relu_saved_tensor_trace():
    trace = inspected("experiment=seed_tiny_relu").trace
    assert [e.kind for e in trace] == ["SAVE"] * 7 + ["LOAD"] * 7
    assert [e.index for e in trace] == list(range(14))
    values = [scalar(e.tensor) for e in trace]
    assert all(abs(v - w) <= EXACT for v, w in zip(values, TRACE_VALUES, strict=True))
    assert all(e.shape == [1, 1] and e.dtype == "torch.float32" for e in trace)
    # which saved tensor each LOAD reads back, and what each saved tensor is
    assert [e.save_index for e in trace[7:]] == [5, 6, 3, 4, 2, 0, 1]
    assert [e.source for e in trace[:7]] == ["x", "0.weight", "h1", "h1", "2.weight", "y_pred", "y"]


def test_relu_off_blocks_gradients():
    record = inspected("experiment=seed_relu_off")
    forward = {s.label: scalar(s.tensor) for s in record.forward}
    assert close(forward, {"z1": -2.5, "h1": 0, "y_pred": 0, "loss": 1})
    grads = {g.name: scalar(g.grad) for g in record.gradients}
    assert close(grads, {"2.weight": 0, "2.bias": -2, "0.weight": 0, "0.bias": 0})


def test_text_report_reads_like_the_tutorial(script, capsys):
    assert script.main(["experiment=seed_tiny_relu"]) == 0
    lines = capsys.readouterr().out.splitlines()

    def rows(title: str) -> dict[str, list[str]]:
        start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 1
        end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
        return {line.split()[0]: line.split() for line in lines[start:end]}

    row = rows("forward")
    assert row["z1"][-2:] == ["AddmmBackward0", "2"]
    assert row["h1"][-2:] == ["ReluBackward0", "2"]
    assert row["y_pred"][-2:] == ["AddmmBackward0", "6"]
    assert row["loss"][-2:] == ["MseLossBackward0", "25"]
    row = rows("gradients")
    assert {name: float(row[name][-1]) for name in TINY_GRADS} == TINY_GRADS
    events = [row[1:4] for row in rows("saved tensors").values()][1:]
    assert [" ".join(event) for event in events] == ["SAVE in forward"] * 7 + ["LOAD in backward"] * 7
    assert any(line.strip().startswith("largest difference 0 ") and line.endswith(": ok") for line in lines)


# ----------------------------------------------------------------------------- seed 003: chain rule


def test_chain_rule_matches_autograd_through_the_tiny_relu_net():
    check = inspected("experiment=seed_tiny_relu").chain_rule
    assert check.applies and check.passed
    assert close({p["name"]: scalar(p["closed_form"]) for p in check.params},
                 {"0.weight": 30, "0.bias": 30, "2.weight": 20, "2.bias": 10})
    assert check.max_abs_diff <= EXACT


@pytest.mark.parametrize("overrides", [
    ("model=linear", "seed=3"),
    (*SIGMOID_NEURON, "seed=1"),
    ("model=mlp", "model.activation=tanh", "seed=2"),
], ids=["linear", "linear+sigmoid", "mlp-tanh"])
def test_chain_rule_passes_on_random_data(overrides):
    parts, x, y = first_batch(*overrides, "dataset=sum_x1_x2")
    check = chain_rule_check(parts.model, parts.loss_fn, x, y)
    assert check.applies and check.passed, check
    assert check.max_abs_diff <= 1e-12
    assert {p["name"] for p in check.params} == {n for n, _ in parts.model.named_parameters()}


def test_chain_rule_on_random_float64_neuron_without_hydra():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh()).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    check = chain_rule_check(model, nn.MSELoss(reduction="sum"), x, y)
    assert check.passed and check.max_abs_diff <= 1e-12


def _forgets_x(x, sigma, upstream, f_prime):
    grad_w, grad_b = seed003_closed_form(x, sigma, upstream, f_prime)
    return grad_w / x.abs().mean(), grad_b


def _forgets_f_prime(x, sigma, upstream, f_prime):
    return seed003_closed_form(x, sigma, upstream, torch.ones_like(f_prime))


@pytest.mark.parametrize("wrong, overrides, bad", [
    (_forgets_x, ("model=linear",), {"0.weight"}),
    (_forgets_f_prime, SIGMOID_NEURON, {"0.weight", "0.bias"}),
], ids=["no-x", "no-f-prime"])
def test_chain_rule_reports_a_wrong_closed_form(wrong, overrides, bad):
    parts, x, y = first_batch(*overrides, "dataset=sum_x1_x2", "seed=4")
    record = inspect_backprop(parts.model, parts.loss_fn, x, y, closed_form=wrong)
    check = record.chain_rule
    assert check.applies and check.passed is False
    assert {p["name"] for p in check.params if not p["ok"]} == bad
    assert check.worst_param in bad and check.max_abs_diff > 1e-3
    assert "MISMATCH" in render_text(record)


def test_chain_rule_says_when_it_does_not_apply():
    x, y = torch.randn(4, 2), torch.rand(4, 1)
    check = chain_rule_check(nn.Sequential(nn.Linear(2, 1)), nn.BCEWithLogitsLoss(), x, y)
    assert not check.applies and check.passed is None and "MSELoss" in check.reason
    check = chain_rule_check(nn.Sequential(nn.Linear(2, 3), nn.GELU(), nn.Linear(3, 1)), nn.MSELoss(), x, y)
    assert not check.applies and "GELU" in check.reason


# ----------------------------------------------------------------------------- gradcheck


def test_gradcheck_mlp_tanh():
    parts, x, y = first_batch("model=mlp", "model.activation=tanh")
    result = gradient_check(parts.model, parts.loss_fn, x, y)
    assert result.passed and result.worst_rel_error <= 1e-6
    assert result.min_relu_input is None
    assert {p["name"] for p in result.params} == {n for n, _ in parts.model.named_parameters()}
    assert all(p["checked"] == p["numel"] for p in result.params)


@pytest.mark.parametrize("overrides", [("experiment=seed_tiny_relu",), ("model.activation=relu",)])
def test_gradcheck_relu_away_from_the_kink(overrides):
    parts, x, y = first_batch(*overrides)
    result = gradient_check(parts.model, parts.loss_fn, x, y)
    assert result.min_relu_input > 100 * result.eps  # a step of eps cannot carry an input across 0
    assert result.passed and result.worst_rel_error <= 1e-6


def test_gradcheck_fails_at_the_relu_kink():
    # z1 = 2*1 - 2 = 0: autograd takes ReLU'(0) = 0, central differences see half the slope
    init = "model.init={0.weight:2.0,0.bias:-2.0,2.weight:3.0,2.bias:0.0}"
    parts, x, y = first_batch("experiment=seed_tiny_relu", init)
    result = gradient_check(parts.model, parts.loss_fn, x, y)
    assert result.min_relu_input == 0 and not result.passed
    assert {p["name"] for p in result.params if not p["ok"]} == {"0.weight", "0.bias"}


def test_gradcheck_does_not_touch_the_inspected_gradients():
    record = inspected("experiment=seed_tiny_relu", gradcheck=True)
    assert record.gradcheck.passed
    assert close({g.name: scalar(g.grad) for g in record.gradients}, TINY_GRADS)


# ----------------------------------------------------------------------------- DOT, JSON, summaries


def test_dot_graph_has_the_grad_fn_chain(tmp_path):
    path = tmp_path / "graph.dot"
    path.write_text(render_dot(inspected("experiment=seed_tiny_relu")))
    (graph,) = pydot.graph_from_dot_file(str(path))
    nodes = {n.get_name(): n.get_label().strip('"') for n in graph.get_nodes()
             if n.get_name() not in ("node", "edge")}
    assert set(nodes) == {
        "MseLossBackward0_0", "AddmmBackward0_0", "AddmmBackward0_1", "ReluBackward0_0", "TBackward0_0",
        "TBackward0_1", *(f"AccumulateGrad_{i}" for i in range(5)),
    }
    assert nodes["MseLossBackward0_0"] == "MseLossBackward0\\nloss"
    assert nodes["ReluBackward0_0"] == "ReluBackward0\\nh1"
    leaves = {label.split("\\n")[1] for name, label in nodes.items() if name.startswith("AccumulateGrad")}
    assert leaves == {"x", "0.weight", "0.bias", "2.weight", "2.bias"}
    edges = {(e.get_source(), e.get_destination()) for e in graph.get_edges()}
    assert len(edges) == 10
    assert {("MseLossBackward0_0", "AddmmBackward0_0"), ("AddmmBackward0_0", "ReluBackward0_0"),
            ("ReluBackward0_0", "AddmmBackward0_1")} <= edges


def test_tensor_view_small_and_large():
    assert tensor_view(torch.tensor([[2.0]])) == {"shape": [1, 1], "values": [[2.0]]}
    big = tensor_view(torch.arange(SMALL + 1, dtype=torch.float32))
    assert set(big) == {"shape", "mean", "std", "min", "max"}
    assert (big["shape"], big["mean"], big["min"], big["max"]) == ([9], 4.0, 0.0, 8.0)


def _tensor_views(node):
    if isinstance(node, dict):
        if "shape" in node and ("values" in node or "mean" in node):
            yield node
        for value in node.values():
            yield from _tensor_views(value)
    elif isinstance(node, list):
        for value in node:
            yield from _tensor_views(value)


def test_large_tensors_are_summarised_never_dumped(script, tmp_path):
    out, dot = tmp_path / "record.json", tmp_path / "graph.dot"
    argv = ["--format", "json", "--output", str(out), "--dot", str(dot), "model.hidden=[16]"]
    assert script.main(argv) == 0
    record = json.loads(out.read_text())
    views = list(_tensor_views(record))
    large = [v for v in views if math.prod(v["shape"]) > SMALL]
    assert large and all(set(v) == {"shape", "mean", "std", "min", "max"} for v in large)
    assert all("values" in v for v in views if math.prod(v["shape"]) <= SMALL)
    assert record["chain_rule"]["passed"] is True
    (graph,) = pydot.graph_from_dot_file(str(dot))
    assert any(n.get_name() == "MseLossBackward0_0" for n in graph.get_nodes())


# ----------------------------------------------------------------------------- command line


@pytest.mark.parametrize("override, message", [
    ("model=mlpp", "gradwatch: model=mlpp is not valid: allowed is one of linear, mlp"),
    ("optimizer.lr=-1", "gradwatch: optimizer.lr=-1 is not valid: allowed is a number > 0"),
    ("nosuchkey=1", "gradwatch: nosuchkey=1 is not valid: allowed is a key of the config: the groups dataset, "),
])
def test_bad_config_is_one_line_and_exit_2(script, capsys, override, message):
    assert script.main([override]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(message) and captured.err.count("\n") == 1


def test_bad_group_option_from_the_shell():
    proc = subprocess.run([sys.executable, SCRIPT, "dataset=nope"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["gradwatch: dataset=nope is not valid: allowed is one of "
                                        "digits, line_2x, points, random_bce, sum_x1_x2"]


def test_script_json_record(json_run):
    out, err = json_run.communicate(timeout=120)
    assert json_run.returncode == 0, err
    record = json.loads(out)
    forward = {s["label"]: scalar(s["tensor"]) for s in record["forward"]}
    assert close(forward, {"z1": 2, "h1": 2, "y_pred": 6, "loss": 25})
    assert [s["grad_fn"] for s in record["forward"]] == [
        "AddmmBackward0", "ReluBackward0", "AddmmBackward0", "MseLossBackward0"
    ]
    grads = {g["name"]: scalar(g["grad"]) for g in record["gradients"]}
    assert close(grads, TINY_GRADS)
    trace = record["trace"]
    assert [e["kind"] for e in trace] == ["SAVE"] * 7 + ["LOAD"] * 7
    values = [scalar(e["tensor"]) for e in trace]
    assert all(abs(v - w) <= EXACT for v, w in zip(values, TRACE_VALUES, strict=True))
    assert all(e["shape"] == [1, 1] and e["dtype"] == "torch.float32" for e in trace)
    assert record["chain_rule"]["passed"] is True and record["chain_rule"]["max_abs_diff"] <= EXACT
    assert record["gradcheck"] is None
