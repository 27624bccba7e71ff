"""Checks of autograd's gradients, each on float64 copies so the inspected pass stays as it was.

- `chain_rule_check`: a closed-form gradient (by default seed 003's, `seed003_closed_form`) applied
  layer by layer from the loss back, for models made of Linear layers (each optionally followed by
  an activation) trained with MSE;
- `gradient_check`: central finite differences for every parameter of any model.
"""

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

from gradwatch.inspect.records import ChainRuleCheck, GradCheck, tensor_view

# (x, sigma, upstream, f_prime) -> (dE/dW, dE/db); see `seed003_closed_form`.
ClosedForm = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]


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
        result.params.append({"name": name, "closed_form": tensor_view(mine), "autograd": tensor_view(auto),
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


