"""Backprop inspector: one forward and one backward pass, shown step by step as the seed tutorials do.

`inspect_backprop(model, loss_fn, x, y)` runs the pass and returns an `Inspection` record:

- `forward`: each leaf module's output in call order (z1, h1, ..., y_pred), then the loss, with the
  name of the `grad_fn` that autograd attached to it;
- `gradients`: every parameter's gradient after the backward pass;
- `trace`: the saved-tensor trace, recorded with `torch.autograd.graph.saved_tensors_hooks`: a SAVE
  event each time the forward pass stores a tensor for later, a LOAD event each time the backward
  pass reads one back;
- `graph`: the `grad_fn` chain from the loss down to the leaves, for `render_dot`;
- `chain_rule`: seed 003's closed-form gradient (REFERENCE.md) against autograd, for models made of
  Linear layers (each optionally followed by an activation) trained with MSE;
- `gradcheck` (on request): autograd against central finite differences in float64.

Tensors with more than `SMALL` elements are summarised as {shape, mean, std, min, max}, so a record
stays readable whatever the model size. Everything here is plain torch: Hydra and the command line
live in scripts/inspect_backprop.py.
"""

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

SMALL = 8

# (x, sigma, upstream, f_prime) -> (dE/dW, dE/db); see `seed003_closed_form`.
ClosedForm = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]


def summarize(tensor: torch.Tensor) -> dict:
    """Values of a small tensor, or statistics of a large one (more than `SMALL` elements).

    >>> summarize(torch.tensor([[2.0]]))
    {'shape': [1, 1], 'values': [[2.0]]}
    >>> sorted(summarize(torch.arange(9.0)))
    ['max', 'mean', 'min', 'shape', 'std']
    """
    tensor = tensor.detach()
    shape = list(tensor.shape)
    if tensor.numel() <= SMALL:
        return {"shape": shape, "values": tensor.tolist()}
    flat = tensor.reshape(-1).to(torch.float64)
    return {
        "shape": shape,
        "mean": flat.mean().item(),
        "std": flat.std().item(),
        "min": flat.min().item(),
        "max": flat.max().item(),
    }


@dataclass
class ForwardStep:
    label: str  # the tutorials' names: z1, h1, ..., y_pred, loss
    module: str  # the module's name in the model ("0", "1", ...), or "loss"
    kind: str  # the module's class: Linear, ReLU, MSELoss, ...
    tensor: dict
    grad_fn: str | None


@dataclass
class ParamGrad:
    name: str
    value: dict
    grad: dict | None  # None when the parameter took no part in the loss


@dataclass
class TraceEvent:
    index: int
    kind: str  # SAVE (forward) or LOAD (backward)
    shape: list[int]
    dtype: str
    tensor: dict
    source: str | None = None  # what was saved: x, y, a forward step's label, or "view of <param>"
    save_index: int | None = None  # for LOAD: the SAVE event whose tensor is read back


@dataclass
class ChainRuleCheck:
    applies: bool
    reason: str
    params: list[dict] = field(default_factory=list)
    max_abs_diff: float | None = None
    worst_param: str | None = None
    tolerance: float = 0.0
    passed: bool | None = None


@dataclass
class GradCheck:
    eps: float
    rtol: float
    atol: float
    params: list[dict] = field(default_factory=list)
    worst_rel_error: float = 0.0
    worst_abs_error: float = 0.0
    worst_param: str | None = None
    min_relu_input: float | None = None  # distance of the closest ReLU input to the kink at 0
    passed: bool = True


@dataclass
class Inspection:
    model: str
    loss_fn: str
    x: dict
    y: dict
    forward: list[ForwardStep]
    loss: float
    gradients: list[ParamGrad]
    trace: list[TraceEvent]
    graph: dict
    chain_rule: ChainRuleCheck | None = None
    gradcheck: GradCheck | None = None

    def step(self, label: str) -> ForwardStep:
        return next(s for s in self.forward if s.label == label)

    def gradient(self, name: str) -> ParamGrad:
        return next(g for g in self.gradients if g.name == name)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- the pass


def _storage_key(tensor: torch.Tensor) -> tuple | None:
    try:
        return (tensor.untyped_storage().data_ptr(), tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
    except (RuntimeError, NotImplementedError):
        return None  # sparse or other storage-less tensors: no source to name


def _source(key: tuple | None, known: list[tuple[str, torch.Tensor]]) -> str | None:
    if key is None or key[0] == 0:
        return None
    views = []
    for name, tensor in known:
        other = _storage_key(tensor)
        if other == key:
            return name
        if other is not None and other[0] == key[0]:
            views.append(name)
    return f"view of {views[0]}" if views else None


def _step_labels(steps: list[tuple[str, nn.Module, torch.Tensor]], output: torch.Tensor) -> list[str]:
    labels, used, linear = [], set(), 0
    for name, module, _ in steps:
        if isinstance(module, nn.Linear):
            linear += 1
            label = f"z{linear}"
        else:
            label = f"h{linear}"
        if label in used:
            label = f"{label}_{name}"
        used.add(label)
        labels.append(label)
    if steps and steps[-1][2] is output:
        labels[-1] = "y_pred"
    return labels


def _autograd_graph(root, names: dict[int, str]) -> dict:
    """The grad_fn chain from `root`, breadth first; node ids are `<class>_<k>`, valid DOT ids."""
    nodes, edges = [], []
    ids: dict[int, str] = {}
    counts: dict[str, int] = {}
    keep = []  # holds every visited node, so no id() is reused while walking
    queue: list = []

    def node_id(fn) -> str:
        if id(fn) not in ids:
            cls = type(fn).__name__
            ids[id(fn)] = f"{cls}_{counts.get(cls, 0)}"
            counts[cls] = counts.get(cls, 0) + 1
            variable = getattr(fn, "variable", None)
            label = names.get(id(variable)) if variable is not None else names.get(id(fn))
            nodes.append({"id": ids[id(fn)], "name": cls, "label": label})
            keep.append(fn)
            queue.append(fn)
        return ids[id(fn)]

    if root is None:
        return {"nodes": nodes, "edges": edges}
    node_id(root)
    while queue:
        fn = queue.pop(0)
        for next_fn, _ in fn.next_functions:
            if next_fn is not None:
                edges.append({"src": ids[id(fn)], "dst": node_id(next_fn)})
    return {"nodes": nodes, "edges": edges}


def trace_pass(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Inspection:
    """One forward and one backward pass with every step recorded; leaves the gradients on `model`."""
    # The input requires grad as in seed 000: only then does the first Linear save its weight, and the
    # trace has the tutorial's 7 SAVE events.
    x = x.detach().clone().requires_grad_(True)
    y = y.detach()
    params = list(model.named_parameters())
    steps: list[tuple[str, nn.Module, torch.Tensor]] = []
    events: list[TraceEvent] = []
    keys: dict[int, tuple | None] = {}

    def on_forward(name: str):
        def hook(module, _inputs, output):
            if isinstance(output, torch.Tensor):
                steps.append((name or "model", module, output))

        return hook

    def event(kind: str, tensor: torch.Tensor, save_index: int | None = None) -> TraceEvent:
        return TraceEvent(len(events), kind, list(tensor.shape), str(tensor.dtype), summarize(tensor),
                          save_index=save_index)

    def pack(tensor):
        keys[len(events)] = _storage_key(tensor)
        events.append(event("SAVE", tensor))
        return events[-1].index, tensor

    def unpack(packed):
        save_index, tensor = packed
        events.append(event("LOAD", tensor, save_index))
        events[-1].source = events[save_index].source
        return tensor

    leaves = [(name, m) for name, m in model.named_modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(on_forward(name)) for name, m in leaves]
    model.zero_grad(set_to_none=True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            output = model(x)
            loss = loss_fn(output, y)
            labels = _step_labels(steps, output)
            # A model whose output is not its last leaf module's (e.g. a residual sum) gets its own step.
            extra_output = not steps or steps[-1][2] is not output
            known = [("x", x), ("y", y)]
            known += [(lab, out) for lab, (_, _, out) in zip(labels, steps, strict=True)]
            if extra_output:
                known.append(("y_pred", output))
            known += params + [("loss", loss)]
            # Named now, while every saved tensor is still held by the graph: after backward their
            # memory may be reused and the storage pointers would no longer identify them.
            for index, key in keys.items():
                events[index].source = _source(key, known)
            # The grad_fn wrappers are kept in a list: torch may drop and rebuild an unreferenced
            # one, and then its id() would no longer match the node met while walking the graph.
            grad_fns = [(out.grad_fn, lab) for lab, out in known[2:] if out.grad_fn is not None]
            names = {id(fn): lab for fn, lab in grad_fns} | {id(p): n for n, p in params}
            names[id(x)] = "x"
            graph = _autograd_graph(loss.grad_fn, names)
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()

    forward = [
        ForwardStep(lab, name, type(module).__name__, summarize(out), _fn_name(out))
        for lab, (name, module, out) in zip(labels, steps, strict=True)
    ]
    if extra_output:
        forward.append(
            ForwardStep("y_pred", "model", type(model).__name__, summarize(output), _fn_name(output))
        )
    forward.append(ForwardStep("loss", "loss", type(loss_fn).__name__, summarize(loss), _fn_name(loss)))
    gradients = [
        ParamGrad(name, summarize(p), None if p.grad is None else summarize(p.grad)) for name, p in params
    ]
    return Inspection(
        model=repr(model),
        loss_fn=repr(loss_fn),
        x=summarize(x),
        y=summarize(y),
        forward=forward,
        loss=loss.item(),
        gradients=gradients,
        trace=events,
        graph=graph,
    )


def _fn_name(tensor: torch.Tensor) -> str | None:
    return None if tensor.grad_fn is None else type(tensor.grad_fn).__name__


# ----------------------------------------------------------------------------- chain rule (seed 003)


def seed003_closed_form(
    x: torch.Tensor, sigma: torch.Tensor, upstream: torch.Tensor, f_prime: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed 003's gradient of one Linear layer, sigma = x W^T + b, output a = f(sigma).

    For E = (w*x + b - y*)^2 the seed derives dE/dw = 2(sigma - y*) x and dE/db = 2(sigma - y*),
    times f'(sigma) with an activation. Batched: `upstream` is dE/da, which is 2(a - y*)/n for the layer
    feeding a mean MSE over n values, and what the next layer passes back for a hidden one.
    """
    delta = upstream * f_prime
    return delta.T @ x, delta.sum(dim=0)


def _relu_derivative(_module, sigma):
    # torch's ReLU backward passes the gradient only where the output is > 0, i.e. 0 at the kink.
    return (sigma > 0).to(sigma.dtype)


def _leaky_relu_derivative(module, sigma):
    return torch.where(sigma > 0, torch.ones_like(sigma), torch.full_like(sigma, module.negative_slope))


def _sigmoid_derivative(_module, sigma):
    s = torch.sigmoid(sigma)
    return s * (1 - s)


ACTIVATION_DERIVATIVES: dict[type, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    nn.Identity: lambda _m, sigma: torch.ones_like(sigma),
    nn.ReLU: _relu_derivative,
    nn.LeakyReLU: _leaky_relu_derivative,
    nn.Tanh: lambda _m, sigma: 1 - torch.tanh(sigma) ** 2,
    nn.Sigmoid: _sigmoid_derivative,
}


def _linear_plan(model: nn.Module) -> list[list] | str:
    """[(prefix, Linear, activation or None), ...] for a stack of Linear layers, else why not."""
    children = list(model.named_children()) if isinstance(model, nn.Sequential) else [("", model)]
    plan: list[list] = []
    for name, module in children:
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Linear):
            plan.append([prefix, module, None])
        elif type(module) in ACTIVATION_DERIVATIVES and plan and plan[-1][2] is None:
            plan[-1][2] = module
        else:
            return f"no closed form for {type(module).__name__} (layer {name or 'model'})"
    return plan or "the model has no Linear layer"


def _as64(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor):
    # Copies, so the checks never disturb the gradients the inspected pass left on the model.
    model64 = copy.deepcopy(model).to(torch.float64)
    model64.zero_grad(set_to_none=True)
    return model64, copy.deepcopy(loss_fn).to(torch.float64), x.detach().double(), y.detach().double()


def chain_rule_check(
    model: nn.Module,
    loss_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    closed_form: ClosedForm = seed003_closed_form,
    tolerance: float = 1e-9,
) -> ChainRuleCheck:
    """The closed form, applied layer by layer from the loss back, against autograd (float64).

    A parameter matches when |closed form - autograd| <= tolerance * max(1, |autograd|max).
    """
    plan = _linear_plan(model)
    if isinstance(plan, str):
        return ChainRuleCheck(False, plan)
    if not isinstance(loss_fn, nn.MSELoss) or loss_fn.reduction not in ("mean", "sum"):
        return ChainRuleCheck(False, f"the closed form is for MSELoss (mean or sum), not {loss_fn!r}")
    model64, loss64, x64, y64 = _as64(model, loss_fn, x, y)
    plan = _linear_plan(model64)
    names = {id(p): n for n, p in model64.named_parameters()}

    with torch.no_grad():
        inputs, sigmas, out = [], [], x64
        for _, linear, activation in plan:
            inputs.append(out)
            sigmas.append(linear(out))
            out = sigmas[-1] if activation is None else activation(sigmas[-1])
        if out.shape != y64.shape:
            shapes = f"output shape {list(out.shape)} differs from target {list(y64.shape)}"
            return ChainRuleCheck(False, shapes)
        upstream = 2 * (out - y64)
        if loss_fn.reduction == "mean":
            upstream = upstream / out.numel()
        closed: dict[str, torch.Tensor] = {}
        layers = list(zip(plan, inputs, sigmas, strict=True))
        for (_, linear, activation), layer_in, sigma in reversed(layers):
            deriv = ACTIVATION_DERIVATIVES[nn.Identity if activation is None else type(activation)]
            f_prime = deriv(activation, sigma)
            grad_w, grad_b = closed_form(layer_in, sigma, upstream, f_prime)
            closed[names[id(linear.weight)]] = grad_w
            if linear.bias is not None:
                closed[names[id(linear.bias)]] = grad_b
            upstream = (upstream * f_prime) @ linear.weight

    loss64(model64(x64), y64).backward()
    result = ChainRuleCheck(True, "Linear layers (+ activation) and MSE", tolerance=tolerance, passed=True)
    result.max_abs_diff = 0.0
    for name, param in model64.named_parameters():
        if name not in closed:
            continue
        auto = param.grad if param.grad is not None else torch.zeros_like(param)
        mine = closed[name]
        if tuple(mine.shape) != tuple(auto.shape):
            diff = math.inf
        else:
            diff = (mine - auto).abs().max().item()
        ok = diff <= tolerance * max(1.0, auto.abs().max().item())
        result.params.append({"name": name, "closed_form": summarize(mine), "autograd": summarize(auto),
                              "max_abs_diff": diff, "ok": ok})
        if result.worst_param is None or diff > result.max_abs_diff:
            result.max_abs_diff, result.worst_param = diff, name
        result.passed = result.passed and ok
    return result


# ----------------------------------------------------------------------------- finite differences


def gradient_check(
    model: nn.Module,
    loss_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float = 1e-6,
    rtol: float = 1e-5,
    atol: float = 1e-8,
    max_elements: int | None = None,
    seed: int = 0,
) -> GradCheck:
    """Autograd against central finite differences, in float64, for every parameter.

    A parameter's relative error is max|autograd - numeric| / max(|autograd|max, |numeric|max); it
    passes when that is <= rtol or the absolute error is <= atol (all-zero gradients of dead units).
    `max_elements` checks a seeded random subset of a large parameter's elements.
    """
    model64, loss64, x64, y64 = _as64(model, loss_fn, x, y)
    relu_inputs: list[float] = []

    def near_kink(_module, inputs):
        relu_inputs.append(inputs[0].detach().abs().min().item())

    handles = [m.register_forward_pre_hook(near_kink) for m in model64.modules()
               if isinstance(m, nn.ReLU | nn.LeakyReLU)]
    try:
        loss64(model64(x64), y64).backward()
    finally:
        for handle in handles:
            handle.remove()

    result = GradCheck(eps, rtol, atol, min_relu_input=min(relu_inputs) if relu_inputs else None)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model64.named_parameters():
            if not param.requires_grad:
                continue
            analytic = (param.grad if param.grad is not None else torch.zeros_like(param)).reshape(-1)
            flat = param.view(-1)  # a view: writes through it move the parameter itself
            picked = torch.arange(flat.numel())
            if max_elements is not None and flat.numel() > max_elements:
                picked = torch.randperm(flat.numel(), generator=gen)[:max_elements].sort().values
            numeric = torch.empty(len(picked), dtype=torch.float64)
            for k, i in enumerate(picked.tolist()):
                original = flat[i].item()
                flat[i] = original + eps
                plus = loss64(model64(x64), y64).item()
                flat[i] = original - eps
                minus = loss64(model64(x64), y64).item()
                flat[i] = original
                numeric[k] = (plus - minus) / (2 * eps)
            auto = analytic[picked]
            abs_err = (auto - numeric).abs().max().item() if len(picked) else 0.0
            scale = max(auto.abs().max().item(), numeric.abs().max().item()) if len(picked) else 0.0
            rel_err = abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else math.inf)
            ok = rel_err <= rtol or abs_err <= atol
            result.params.append({"name": name, "checked": len(picked), "numel": flat.numel(),
                                  "abs_error": abs_err, "rel_error": rel_err, "ok": ok})
            if result.worst_param is None or rel_err > result.worst_rel_error:
                result.worst_rel_error, result.worst_param = rel_err, name
            result.worst_abs_error = max(result.worst_abs_error, abs_err)
            result.passed = result.passed and ok
    return result


def inspect_backprop(
    model: nn.Module,
    loss_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    gradcheck: bool = False,
    closed_form: ClosedForm = seed003_closed_form,
) -> Inspection:
    """The whole record: the traced pass, the chain-rule check and, on request, the gradient check."""
    record = trace_pass(model, loss_fn, x, y)
    record.chain_rule = chain_rule_check(model, loss_fn, x, y, closed_form)
    if gradcheck:
        record.gradcheck = gradient_check(model, loss_fn, x, y)
    return record


# ----------------------------------------------------------------------------- renderers


def _number(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _nested(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_nested(v) for v in value) + "]"
    return _number(value)


def _values(view: dict) -> str:
    if "values" not in view:
        return " ".join(f"{k}={_number(view[k])}" for k in ("mean", "std", "min", "max"))
    value = view["values"]
    while isinstance(value, list) and len(value) == 1:
        value = value[0]
    # A one-element tensor reads as its number, as the tutorials print .item(); others keep their nesting.
    return _number(value) if not isinstance(value, list) else _nested(view["values"])


def _shape(view_or_shape) -> str:
    shape = view_or_shape["shape"] if isinstance(view_or_shape, dict) else view_or_shape
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def render_text(record: Inspection) -> str:
    """The record as the tutorials print it: forward, gradients, trace, checks."""
    lines = [f"model: {' '.join(record.model.split())}", f"loss:  {record.loss_fn}",
             f"batch: x {_shape(record.x)}, y {_shape(record.y)}", "", "forward"]
    rows = [["step", "module", "kind", "shape", "grad_fn", "value"]]
    rows += [[s.label, s.module, s.kind, _shape(s.tensor), s.grad_fn or "-", _values(s.tensor)]
             for s in record.forward]
    lines += _table(rows)

    lines += ["", "gradients (after one backward)"]
    rows = [["parameter", "shape", "value", "dL/dparameter"]]
    rows += [[g.name, _shape(g.value), _values(g.value), "None" if g.grad is None else _values(g.grad)]
             for g in record.gradients]
    lines += _table(rows)

    saves = sum(e.kind == "SAVE" for e in record.trace)
    lines += ["", f"saved tensors (x requires grad): {saves} SAVE in forward, "
              f"{len(record.trace) - saves} LOAD in backward"]
    rows = [["#", "event", "shape", "dtype", "value", "tensor"]]
    for e in record.trace:
        what = e.source or "-"
        if e.kind == "LOAD":
            what = f"saved at {e.save_index:02d}" + (f" ({e.source})" if e.source else "")
        tag = "SAVE in forward" if e.kind == "SAVE" else "LOAD in backward"
        rows.append([f"{e.index:02d}", tag, _shape(e.shape), e.dtype, _values(e.tensor), what])
    lines += _table(rows)

    check = record.chain_rule
    if check is not None:
        lines += ["", "chain rule (seed 003 closed form against autograd, float64)"]
        if not check.applies:
            lines.append(f"  not applicable: {check.reason}")
        else:
            rows = [["parameter", "closed form", "autograd", "max |diff|", ""]]
            rows += [[p["name"], _values(p["closed_form"]), _values(p["autograd"]),
                      _number(p["max_abs_diff"]), "ok" if p["ok"] else "MISMATCH"] for p in check.params]
            lines += _table(rows)
            verdict = "ok" if check.passed else "MISMATCH"
            worst = f"{_number(check.max_abs_diff)} ({check.worst_param})"
            lines.append(f"  largest difference {worst}: {verdict}")

    grad = record.gradcheck
    if grad is not None:
        lines += ["", f"gradcheck (central finite differences, eps={grad.eps:g}, float64)"]
        rows = [["parameter", "checked", "abs error", "rel error", ""]]
        rows += [[p["name"], f"{p['checked']}/{p['numel']}", _number(p["abs_error"]), _number(p["rel_error"]),
                  "ok" if p["ok"] else "FAIL"] for p in grad.params]
        lines += _table(rows)
        if grad.min_relu_input is not None:
            lines.append(f"  closest ReLU input to the kink at 0: {_number(grad.min_relu_input)}")
        verdict = "ok" if grad.passed else "FAIL"
        worst = f"{_number(grad.worst_rel_error)} ({grad.worst_param})"
        lines.append(f"  worst relative error {worst}: {verdict}")
    return "\n".join(lines) + "\n"


def _finite(value):
    # Strict JSON has no NaN or Infinity; a NaN loss is worth inspecting, so it is kept as a string.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def render_json(record: Inspection) -> str:
    return json.dumps(_finite(record.to_dict()), indent=2, allow_nan=False) + "\n"


def _dot_label(*parts: str) -> str:
    escaped = (part.replace("\\", "\\\\").replace('"', '\\"') for part in parts)
    return '"' + "\\n".join(escaped) + '"'


def render_dot(record: Inspection) -> str:
    """The grad_fn chain as Graphviz DOT; arrows point the way gradients flow, from the loss down."""
    lines = ["digraph autograd {", "  rankdir=TB;", '  node [shape=box, fontname="monospace"];']
    for node in record.graph["nodes"]:
        label = _dot_label(node["name"], *([] if node["label"] is None else [node["label"]]))
        style = ', style=filled, fillcolor="lightblue"' if node["name"] == "AccumulateGrad" else ""
        lines.append(f"  {node['id']} [label={label}{style}];")
    for edge in record.graph["edges"]:
        lines.append(f"  {edge['src']} -> {edge['dst']};")
    lines.append("}")
    return "\n".join(lines) + "\n"
