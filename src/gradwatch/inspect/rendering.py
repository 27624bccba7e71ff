"""An `Inspection` as text (the tutorials' tables, aligned by `tabulate`), strict JSON, or Graphviz DOT."""

import json
import math

from tabulate import tabulate

from gradwatch.inspect.records import Inspection

INDENT = "  "


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


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    # Cells are already formatted (6 significant digits, "00" indices): tabulate only aligns them.
    text = tabulate(rows, headers=header, tablefmt="plain", disable_numparse=True)
    return [(INDENT + line).rstrip() for line in text.splitlines()]


def render_text(record: Inspection) -> str:
    """The record as the tutorials print it: forward, gradients, trace, checks."""
    lines = [f"model: {' '.join(record.model.split())}", f"loss:  {record.loss_fn}",
             f"batch: x {_shape(record.x)}, y {_shape(record.y)}", "", "forward"]
    lines += _table(["step", "module", "kind", "shape", "grad_fn", "value"],
                    [[s.label, s.module, s.kind, _shape(s.tensor), s.grad_fn or "-", _values(s.tensor)]
                     for s in record.forward])

    lines += ["", "gradients (after one backward)"]
    lines += _table(["parameter", "shape", "value", "dL/dparameter"],
                    [[g.name, _shape(g.value), _values(g.value), "None" if g.grad is None else _values(g.grad)]
                     for g in record.gradients])

    saves = sum(e.kind == "SAVE" for e in record.trace)
    lines += ["", f"saved tensors (x requires grad): {saves} SAVE in forward, "
              f"{len(record.trace) - saves} LOAD in backward"]
    rows = []
    for e in record.trace:
        what = e.source or "-"
        if e.kind == "LOAD":
            what = f"saved at {e.save_index:02d}" + (f" ({e.source})" if e.source else "")
        tag = "SAVE in forward" if e.kind == "SAVE" else "LOAD in backward"
        rows.append([f"{e.index:02d}", tag, _shape(e.shape), e.dtype, _values(e.tensor), what])
    lines += _table(["#", "event", "shape", "dtype", "value", "tensor"], rows)

    check = record.chain_rule
    if check is not None:
        lines += ["", "chain rule (seed 003 closed form against autograd, float64)"]
        if not check.applies:
            lines.append(f"{INDENT}not applicable: {check.reason}")
        else:
            lines += _table(["parameter", "closed form", "autograd", "max |diff|", ""],
                            [[p["name"], _values(p["closed_form"]), _values(p["autograd"]),
                              _number(p["max_abs_diff"]), "ok" if p["ok"] else "MISMATCH"] for p in check.params])
            verdict = "ok" if check.passed else "MISMATCH"
            worst = f"{_number(check.max_abs_diff)} ({check.worst_param})"
            lines.append(f"{INDENT}largest difference {worst}: {verdict}")

    grad = record.gradcheck
    if grad is not None:
        lines += ["", f"gradcheck (central finite differences, eps={grad.eps:g}, float64)"]
        lines += _table(["parameter", "checked", "abs error", "rel error", ""],
                        [[p["name"], f"{p['checked']}/{p['numel']}", _number(p["abs_error"]),
                          _number(p["rel_error"]), "ok" if p["ok"] else "FAIL"] for p in grad.params])
        if grad.min_relu_input is not None:
            lines.append(f"{INDENT}closest ReLU input to the kink at 0: {_number(grad.min_relu_input)}")
        verdict = "ok" if grad.passed else "FAIL"
        worst = f"{_number(grad.worst_rel_error)} ({grad.worst_param})"
        lines.append(f"{INDENT}worst relative error {worst}: {verdict}")
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
