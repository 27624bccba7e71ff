"""Config -> objects, with every check done before any training starts.

Each check raises `ConfigError` naming the key, the value and what is allowed: the scalar keys
first (`check_config`), then the objects as they are built, and last one training step on copies
(`check_one_step`), so that a value torch refuses is reported as a config error, not a traceback.
"""

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from gradwatch.config.checks import check_config
from gradwatch.config.errors import ConfigError, first_line
from gradwatch.training.data import TensorBatches
from gradwatch.training.models import apply_init, init_scheme

_BCE_LOSSES = (nn.BCEWithLogitsLoss, nn.BCELoss)
_BATCHING_KEYS = ("batch_size", "shuffle", "seed")
_INIT_KEYS = ("init", "weight_init", "bias_init")


@dataclass
class Parts:
    model: nn.Module
    loss_fn: nn.Module
    optimizer: Callable
    x: torch.Tensor
    y: torch.Tensor
    batches: TensorBatches


def call_target(node: dict, **kwargs):
    """instantiate(), but a ConfigError raised inside the target reaches the user unwrapped."""
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def _group(cfg: DictConfig, key: str, drop: tuple[str, ...] = ()) -> dict:
    node = OmegaConf.to_container(cfg[key], resolve=True)
    return {k: v for k, v in node.items() if k not in drop}


def cfg_choice(cfg: DictConfig) -> str:
    """The dataset option's name, from its builder (`gradwatch.training.data.sum_x1_x2` -> sum_x1_x2)."""
    return str(cfg.dataset.get("_target_", "?")).rsplit(".", 1)[-1]


def _feature_size(cfg: DictConfig, key: str, data_size: int, what: str) -> int:
    size = cfg.model.get(key)
    if size is None:
        return data_size
    if size != data_size:
        raise ConfigError(f"model.{key}", size, f"{data_size} (the dataset's {what} size) or null")
    return size


def build(cfg: DictConfig) -> Parts:
    """Everything a run trains with, checked. Seeds torch first, so the same seed gives the same model."""
    check_config(cfg)
    seed = cfg.seed
    data_seed = cfg.dataset.get("seed")
    data_seed = seed if data_seed is None else data_seed
    x, y = call_target(_group(cfg, "dataset", drop=_BATCHING_KEYS), seed=data_seed)
    batches = TensorBatches(x, y, cfg.dataset.get("batch_size"), cfg.dataset.get("shuffle", True), data_seed)

    loss_fn = call_target(_group(cfg, "loss"))
    if isinstance(loss_fn, _BCE_LOSSES) and not bool(((y >= 0) & (y <= 1)).all()):
        bad = sorted({round(v, 4) for v in y.reshape(-1).tolist() if not 0 <= v <= 1})
        shown = ", ".join(map(str, bad[:5])) + (f", ... ({len(bad)} values)" if len(bad) > 5 else "")
        # Name the key that holds the targets where the dataset has one, else the loss.
        key = next((f"dataset.{k}" for k in ("labels", "y") if k in cfg.dataset), None)
        if key is None:
            raise ConfigError("loss", type(loss_fn).__name__,
                              f"a loss for targets outside [0, 1] (the {cfg_choice(cfg)} dataset has {shown})")
        raise ConfigError(key, f"[{shown}]", f"targets in [0, 1] for {type(loss_fn).__name__}")

    pl.seed_everything(seed, workers=True, verbose=False)
    in_features = _feature_size(cfg, "in_features", x.shape[1], "input")
    out_features = _feature_size(cfg, "out_features", y.shape[1], "target")
    model = call_target(_group(cfg, "model", drop=_INIT_KEYS), in_features=in_features, out_features=out_features)
    init_scheme(model, cfg.model.get("weight_init", "default"), cfg.model.get("bias_init"))
    init = cfg.model.get("init")
    apply_init(model, OmegaConf.to_container(init, resolve=True) if init is not None else None)

    with torch.no_grad():
        out_shape = tuple(model(x[:1]).shape[1:])
    if out_shape != tuple(y.shape[1:]):
        raise ConfigError("model", f"output shape {list(out_shape)}", f"the dataset's target shape {list(y.shape[1:])}")

    optimizer = call_target(_group(cfg, "optimizer"))
    check_one_step(model, loss_fn, optimizer, batches, _group(cfg, "optimizer"))
    return Parts(model, loss_fn, optimizer, x, y, batches)


# torch's words for an optimizer's keys, where its message does not spell the key itself.
_TORCH_WORDS = {"learning rate": "lr", "epsilon": "eps", "beta": "betas"}
_TORCH_ERRORS = (ValueError, TypeError, RuntimeError, IndexError)


def _optimizer_key(err: BaseException, node: dict) -> str:
    """The optimizer key torch's message names ("Invalid momentum value" -> momentum), else ""."""
    text = str(err).lower()
    words = {k: k for k in node if not k.startswith("_")}
    words |= {word: key for word, key in _TORCH_WORDS.items() if key in node}
    found = [(match.start(), key) for word, key in words.items()
             if (match := re.search(rf"\b{re.escape(word.lower())}\b", text))]
    return min(found)[1] if found else ""


def check_one_step(model: nn.Module, loss_fn: nn.Module, optimizer: Callable, batches: TensorBatches,
                   optimizer_node: dict) -> None:
    """One training step on copies: the optimizer built, the loss and its backward on the first batch,
    one update. What torch refuses becomes a ConfigError naming `optimizer.<key>`, `optimizer` or `loss`.

    The model, its gradients, the batches' position and the random state stay as they were.
    """
    name = str(optimizer_node.get("_target_", "the optimizer")).rsplit(".", 1)[-1]

    def optimizer_error(err: BaseException) -> ConfigError:
        key = _optimizer_key(err, optimizer_node)
        value = optimizer_node[key] if key else name
        return ConfigError(f"optimizer.{key}" if key else "optimizer", value,
                           f"a value {name} accepts ({first_line(err)})")

    probe = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        try:
            step = optimizer(probe.parameters())
        except _TORCH_ERRORS as err:
            raise optimizer_error(err) from err
        x, y = next(iter(copy.copy(batches)))  # a copy: the real batches keep their epoch count
        loss_fn = copy.deepcopy(loss_fn)
        try:
            with torch.no_grad():
                out_shape = list(probe(x).shape)
        except _TORCH_ERRORS as err:
            raise ConfigError("model", type(model).__name__,
                              f"a model of the dataset's inputs {list(x.shape)} ({first_line(err)})") from err

        def closure() -> torch.Tensor:
            # What Lightning hands optimizer.step, so optimizers that need one (LBFGS) pass too.
            step.zero_grad()
            loss = loss_fn(probe(x), y)
            loss.backward()
            return loss

        try:
            closure()
        except _TORCH_ERRORS as err:
            shapes = f"the model's output {out_shape} and the dataset's targets {list(y.shape)}"
            raise ConfigError("loss", type(loss_fn).__name__, f"a loss of {shapes} ({first_line(err)})") from err
        try:
            step.step(closure)
        except _TORCH_ERRORS as err:
            raise optimizer_error(err) from err
