"""Model builders. Every model is an nn.Sequential, so parameter names are `0.weight`, `0.bias`, ..."""

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from gradwatch.config.checks import check
from gradwatch.config.errors import ConfigError, check_int, is_number

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


def _activation(key: str, name: str | None) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ConfigError(key, name, "one of " + ", ".join(ACTIVATIONS))
    return ACTIVATIONS[name]()


def linear(in_features: int, out_features: int, bias: bool = True) -> nn.Sequential:
    """One linear layer: `linear(2, 1)` has parameters `0.weight` (1x2) and `0.bias` (1)."""
    check("model.in_features", in_features)
    check("model.out_features", out_features)
    return nn.Sequential(nn.Linear(in_features, out_features, bias=bias))


def mlp(
    in_features: int,
    out_features: int,
    hidden: Sequence[int] = (16,),
    activation: str = "relu",
    output_activation: str | None = None,
    bias: bool = True,
) -> nn.Sequential:
    """Linear, activation, ..., Linear[, output activation].

    `mlp(2, 1, hidden=[3])` is Sequential(Linear(2, 3), ReLU(), Linear(3, 1)).
    """
    check("model.in_features", in_features)
    check("model.out_features", out_features)
    if hidden is not None and (isinstance(hidden, str) or not isinstance(hidden, Sequence)):
        raise ConfigError("model.hidden", hidden, "a list of integers >= 1, e.g. [16, 16] (or [] for none)")
    sizes = [in_features]
    for i, width in enumerate(hidden or []):
        sizes.append(check_int(f"model.hidden[{i}]", width, minimum=1))
    sizes.append(out_features)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out, bias=bias))
        if i < len(sizes) - 2:
            layers.append(_activation("model.activation", activation))
    if output_activation is not None:
        layers.append(_activation("model.output_activation", output_activation))
    return nn.Sequential(*layers)


WEIGHT_INITS = {
    "default": None,
    "xavier_uniform": nn.init.xavier_uniform_,
    "xavier_normal": nn.init.xavier_normal_,
    "kaiming_uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
    "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
}


def init_scheme(model: nn.Module, weight_init: str = "default", bias_init: float | None = None) -> None:
    """Re-initialise every Linear layer: a weight scheme by name, and biases filled with a number."""
    if weight_init not in WEIGHT_INITS:
        raise ConfigError("model.weight_init", weight_init, "one of " + ", ".join(WEIGHT_INITS))
    check("model.bias_init", bias_init)
    scheme = WEIGHT_INITS[weight_init]
    with torch.no_grad():
        for layer in model.modules():
            if not isinstance(layer, nn.Linear):
                continue
            if scheme is not None:
                scheme(layer.weight)
            if bias_init is not None and layer.bias is not None:
                layer.bias.fill_(float(bias_init))


def apply_init(model: nn.Module, init: Mapping[str, object] | None) -> None:
    """Set parameters by name: a number fills the tensor, a nested list gives exact values."""
    if not init:
        return
    params = dict(model.named_parameters())
    for name, value in init.items():
        key = f"model.init.{name}"
        if name not in params:
            raise ConfigError(key, value, "a parameter of the model: " + ", ".join(params))
        param = params[name]
        with torch.no_grad():
            if is_number(value):
                param.fill_(float(value))
                continue
            try:
                tensor = torch.as_tensor(value, dtype=param.dtype)
            except (TypeError, ValueError) as err:
                raise ConfigError(key, value, "a number or a nested list of numbers") from err
            if tensor.shape != param.shape:
                raise ConfigError(
                    key, value, f"a number or a nested list of shape {list(param.shape)}"
                )
            param.copy_(tensor)
