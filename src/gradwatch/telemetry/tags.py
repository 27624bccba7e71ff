"""TensorBoard tag names: the one place they are spelled (docs/telemetry.md)."""

import re

LOSS = "train/loss"
ACCURACY = "train/accuracy"
LR = "lr"
GLOBAL_NORM = "grad/global_norm"

# Per-parameter gradient statistics, in the order the telemetry computes them.
GRAD_STATS = ("mean", "std", "zero_fraction", "norm", "abs_max", "nonfinite")
# Per-layer activation statistics (per batch) and the per-epoch dead fraction.
ACT_STATS = ("dead_fraction", "zero_fraction")
ACT_EPOCH = "dead_fraction_epoch"


def grad(param: str, stat: str) -> str:
    return f"grad/{param}/{stat}"


def act(layer: str, stat: str) -> str:
    return f"act/{layer}/{stat}"


def update(param: str) -> str:
    """The update-to-weight ratio of a step: ||theta after - theta before|| / ||theta before||."""
    return f"update/{param}/ratio"


def hparam_metric(name: str) -> str:
    """A final metric in TensorBoard's HParams tab: `hparams/final_loss`."""
    return f"hparams/{name}"


def is_grad_stat(tag: str, stat: str) -> bool:
    """`grad/<param>/<stat>` for any parameter (`grad/global_norm` is not a parameter's).

    >>> is_grad_stat("grad/0.weight/nonfinite", "nonfinite"), is_grad_stat("grad/global_norm", "norm")
    (True, False)
    """
    return tag.startswith("grad/") and tag.endswith(f"/{stat}")


def grad_histogram(param: str) -> str:
    return f"grad/{param}"


def is_weight(param: str) -> bool:
    """A layer's weight (`0.weight`, `conv.weight`), as against its bias."""
    return param.rsplit(".", 1)[-1] == "weight"


GRADIENT_FLOW = "gradient flow"  # the custom-scalars category of every weight's gradient norm


def _exactly(tag: str) -> str:
    """A chart's regex for one tag. TensorBoard searches (does not match) a chart's regexes, so
    they are anchored: `act/1/dead_fraction` alone would also draw `act/1/dead_fraction_epoch`."""
    return f"^{re.escape(tag)}$"


# Charts over every weight or every ReLU layer, by pattern: the same chart in every run of a sweep,
# whatever its depth, so that TensorBoard (which merges the runs' layouts) shows it once.
EVERY_WEIGHT_NORM = r"^grad/(.+\.)?weight/norm$"
EVERY_WEIGHT_UPDATE = r"^update/(.+\.)?weight/ratio$"


def _every_layer(stat: str) -> str:
    return rf"^act/[^/]+/{stat}$"


def custom_scalars_layout(params: list[str], layers: list[str], averaged: bool = False) -> dict:
    r"""TensorBoard's custom-scalars layout, categories named after what they hold (every chart
    has data in any run: accuracy and learning rate are in the Scalars tab): the loss, then
    the gradient flow (every weight's gradient norm in one chart, so that a first layer 1e-5
    times the last shows; every weight's update ratio), the ReLU layers' dead fractions, and one
    category of gradient statistics per module. `averaged`: only the charts of the tags a sweep's
    mean over seeds holds (`summary.aggregate`): gradient norms and dead fractions.

    >>> layout = custom_scalars_layout(["0.weight", "0.bias", "2.weight"], ["1"])
    >>> list(layout)
    ['training', 'gradient flow', 'dead ReLUs', 'gradients of 0 (weight, bias)', 'gradients of 2 (weight)']
    >>> layout["gradient flow"]["gradient norm of every weight"]
    ['Multiline', ['^grad/(.+\\.)?weight/norm$']]
    >>> layout["gradients of 0 (weight, bias)"]["gradient mean"]
    ['Multiline', ['^grad/0\\.weight/mean$', '^grad/0\\.bias/mean$']]
    """
    layout: dict = {"training": {"loss": ["Multiline", [_exactly(LOSS)]]}}
    if any(is_weight(p) for p in params):
        flow = {"gradient norm of every weight": ["Multiline", [EVERY_WEIGHT_NORM]]}
        if not averaged:
            flow["update ratio of every weight"] = ["Multiline", [EVERY_WEIGHT_UPDATE]]
        layout[GRADIENT_FLOW] = {**flow, "global gradient norm": ["Multiline", [_exactly(GLOBAL_NORM)]]}
    if layers:
        layout["dead ReLUs"] = {"dead fraction (units silent for the whole batch), every ReLU layer": [
            "Multiline", [_every_layer("dead_fraction")]]}
        if not averaged:
            layout["dead ReLUs"] |= {
                "units that never fired in the epoch, every ReLU layer": ["Multiline", [_every_layer(ACT_EPOCH)]],
                "zero activations, every ReLU layer": ["Multiline", [_every_layer("zero_fraction")]]}
    by_module: dict[str, list[str]] = {}
    for param in params:
        by_module.setdefault(param.rsplit(".", 1)[0], []).append(param)
    for module, names in by_module.items():
        kinds = ", ".join(n.rsplit(".", 1)[-1] for n in names)
        layout[f"gradients of {module} ({kinds})"] = {
            f"gradient {stat}": ["Multiline", [_exactly(grad(n, stat)) for n in names]]
            for stat in (("norm",) if averaged else GRAD_STATS)}
    return layout


def is_dead_fraction(tag: str) -> bool:
    return tag.startswith("act/") and tag.endswith("/dead_fraction")


def layer_of(tag: str) -> str:
    """`act/1/dead_fraction` -> `1`; `grad/0.weight/mean` -> `0.weight`."""
    return tag.split("/", 1)[1].rsplit("/", 1)[0]
