"""TensorBoard tag names: the one place they are spelled (DESIGN.md, "TensorBoard tags")."""

LOSS = "train/loss"
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


def is_dead_fraction(tag: str) -> bool:
    return tag.startswith("act/") and tag.endswith("/dead_fraction")


def layer_of(tag: str) -> str:
    """`act/1/dead_fraction` -> `1`; `grad/0.weight/mean` -> `0.weight`."""
    return tag.split("/", 1)[1].rsplit("/", 1)[0]
