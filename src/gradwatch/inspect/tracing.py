"""One forward and one backward pass, every step recorded: `trace_pass(model, loss_fn, x, y)`.

- each leaf module's output in call order (z1, h1, ..., y_pred), then the loss, with the name of
  the `grad_fn` autograd attached to it;
- every parameter's gradient after the backward pass;
- the saved-tensor trace, recorded with `torch.autograd.graph.saved_tensors_hooks`: a SAVE event
  each time the forward pass stores a tensor for later, a LOAD event each time the backward pass
  reads one back;
- the `grad_fn` chain from the loss down to the leaves (rendered by `rendering.render_dot`).
"""

import torch
from torch import nn

from gradwatch.inspect.records import ForwardStep, Inspection, ParamGrad, TraceEvent, tensor_view


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
        return TraceEvent(len(events), kind, list(tensor.shape), str(tensor.dtype), tensor_view(tensor),
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
        ForwardStep(lab, name, type(module).__name__, tensor_view(out), _fn_name(out))
        for lab, (name, module, out) in zip(labels, steps, strict=True)
    ]
    if extra_output:
        forward.append(
            ForwardStep("y_pred", "model", type(model).__name__, tensor_view(output), _fn_name(output))
        )
    forward.append(ForwardStep("loss", "loss", type(loss_fn).__name__, tensor_view(loss), _fn_name(loss)))
    gradients = [
        ParamGrad(name, tensor_view(p), None if p.grad is None else tensor_view(p.grad)) for name, p in params
    ]
    return Inspection(
        model=repr(model),
        loss_fn=repr(loss_fn),
        x=tensor_view(x),
        y=tensor_view(y),
        forward=forward,
        loss=loss.item(),
        gradients=gradients,
        trace=events,
        graph=graph,
    )


def _fn_name(tensor: torch.Tensor) -> str | None:
    return None if tensor.grad_fn is None else type(tensor.grad_fn).__name__


