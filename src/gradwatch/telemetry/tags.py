"""TensorBoard tag names: the one place they are spelled (README, "TensorBoard tags")."""

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


def custom_scalars_layout(params: list[str], layers: list[str]) -> dict:
    r"""TensorBoard's custom-scalars layout: one category per layer, one chart per statistic
    holding that layer's parameters (`0.weight` and `0.bias` together), and its activations.

    >>> custom_scalars_layout(["0.weight", "0.bias"], ["1"])["layer 0"]["grad mean"]
    ['Multiline', ['grad/0\\.weight/mean', 'grad/0\\.bias/mean']]
    """
    by_layer: dict[str, list[str]] = {}
    for param in params:
        by_layer.setdefault(param.rsplit(".", 1)[0], []).append(param)
    layout: dict = {}
    for layer, names in by_layer.items():
        layout[f"layer {layer}"] = {
            f"grad {stat}": ["Multiline", [re.escape(grad(n, stat)) for n in names]] for stat in GRAD_STATS
        }
        layout[f"layer {layer}"]["update ratio"] = ["Multiline", [re.escape(update(n)) for n in names]]
    for layer in layers:
        layout.setdefault(f"layer {layer}", {})["activations"] = [
            "Multiline", [re.escape(act(layer, stat)) for stat in (*ACT_STATS, ACT_EPOCH)]]
    layout["training"] = {"loss": ["Multiline", [re.escape(LOSS)]],
                          "global norm": ["Multiline", [re.escape(GLOBAL_NORM)]]}
    return layout


def is_dead_fraction(tag: str) -> bool:
    return tag.startswith("act/") and tag.endswith("/dead_fraction")


def layer_of(tag: str) -> str:
    """`act/1/dead_fraction` -> `1`; `grad/0.weight/mean` -> `0.weight`."""
    return tag.split("/", 1)[1].rsplit("/", 1)[0]
