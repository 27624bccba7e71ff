"""What one inspected pass produced: plain dataclasses, with tensors kept as small views.

A tensor with more than `SMALL` elements is kept as {shape, mean, std, min, max} (`tensor_view`),
so a record stays readable, and serialisable, whatever the model size.
"""

from dataclasses import asdict, dataclass, field

import torch

SMALL = 8


def tensor_view(tensor: torch.Tensor) -> dict:
    """Values of a small tensor, or statistics of a large one (more than `SMALL` elements).

    >>> tensor_view(torch.tensor([[2.0]]))
    {'shape': [1, 1], 'values': [[2.0]]}
    >>> sorted(tensor_view(torch.arange(9.0)))
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
