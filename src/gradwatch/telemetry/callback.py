"""The telemetry callback: gradient statistics, dead-ReLU rates and update ratios, every N steps.

"What" lives in `gradwatch.telemetry.stats`; this adapter decides "when" and hands the numbers to a
`StepRecorder`, which writes them with the step's loss as one event. Inside gradwatch's pipeline
the recorder is given; in any other Lightning project the callback makes its own, writing into
the Trainer's loggers (TensorBoard's folder directly, any other logger through `log_metrics`).
What it supports and refuses: docs/callback.md.
"""

import functools
import itertools
import logging
import math
import operator
import types
from collections.abc import Callable

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import OmegaConf
from torch import nn

from gradwatch.config.checks import check
from gradwatch.config.cli import CONF_DIR
from gradwatch.config.errors import ConfigError
from gradwatch.storage.names import JoinedNames
from gradwatch.telemetry import tags
from gradwatch.telemetry.distributed import combine_unit_counts, world
from gradwatch.telemetry.recorder import Readback, StepRecorder, on_host
from gradwatch.telemetry.stats import (
    ActivationStats,
    GradientStats,
    UpdateRatio,
    by_units,
    counts_calls_apart,
    unit_shape,
    unit_view,
)

log = logging.getLogger(__name__)


def _merged_rows(stats: ActivationStats, finish: Callable, parts: tuple[int, ...], values: np.ndarray) -> np.ndarray:
    """`finish(values)`, the rows of a set whose modules called on several widths are several
    layers of `stats`, merged into one row per module (`ActivationStats.merged`)."""
    return stats.merged(finish(values), parts)

ON_NONFINITE = ("warn", "stop")
DEAD_UNIT_MODULES = (nn.ReLU, nn.ReLU6)
# Activations whose outputs are not ReLU-like (negative values, no exact zeros): not counted, named
# at fit start (docs/callback.md).
OTHER_ACTIVATIONS = (nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                     nn.Hardswish, nn.Softplus)
_VERSION = operator.attrgetter("_version")
# The defaults' one home: the telemetry config gradwatch's pipeline composes.
DEFAULTS = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "telemetry" / "default.yaml"))
_NONFINITE = tags.GRAD_STATS.index("nonfinite")
_GRAD = operator.attrgetter("grad")
_SHAPE = operator.attrgetter("shape")
_FIRST = operator.itemgetter(0)


def relu_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose units can die: `[("1", ReLU())]` for Linear-ReLU-Linear."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DEAD_UNIT_MODULES)]


def network_of(pl_module: pl.LightningModule) -> nn.Module:
    """Whose parameters and layers are named in the tags: gradwatch's own module wraps its network
    as `model` (names `0.weight`); any other LightningModule is the network itself (`conv.weight`)."""
    from gradwatch.training.module import GradwatchModule

    return pl_module.model if isinstance(pl_module, GradwatchModule) else pl_module


class _OutputTap:
    """Appends each output of `module` to `calls`, and adds its version counter (`Tensor._version`,
    which any in-place op on it moves) to `versions[index]`, while `owner._recording` is true, by
    wrapping its `forward` on the instance, until `remove()`. A forward hook would do the same,
    but any hook sends every call of the module through `Module._call_impl`'s slow path: measured
    2-3 us more per call, 0.1-0.3 ms a step on a 50-layer net, the largest part of the
    activations' cost there; the wrapper is one Python frame (the test inline, not a call: ~0.3 us
    a call less in a training step). The wrapper is a bound method, so a deep copy of the module
    (an EMA copy, say) calls its own forward.

    `versions[index]` is the sum of the versions the layer's outputs had when recorded: versions
    only grow, so the outputs' versions sum to it later only if none was changed in place since.
    An out-of-place ReLU's output is a tensor just made, whose version is 0: nothing to add, and
    nothing read (one attribute read and one list append less per call than a version list)."""

    def __init__(self, module: nn.Module, calls: list, owner: "GradientTelemetry", versions: list[int] | None = None,
                 index: int = 0):
        self.module = module
        self.previous = module.__dict__.get("forward")  # a forward already set on the instance
        inner = self.previous
        append = calls.append
        if versions is None:
            versions, index = [0], 0

        if inner is None and type(module).forward is nn.ReLU.forward:
            # nn.ReLU's own forward inline: one frame and no argument packing less a call, on
            # every ReLU call of a step (F.relu is what nn.ReLU.forward calls).
            relu = nn.functional.relu

            def forward(self_, input):
                if not self_.inplace:
                    output = relu(input)
                    if owner._recording:
                        append(output)  # a new tensor: version 0, nothing to add
                    return output
                output = relu(input, inplace=True)
                if owner._recording:
                    append(output)
                    versions[index] += output._version
                return output
        elif inner is None:
            def forward(self_, *args, **kwargs):
                output = type(self_).forward(self_, *args, **kwargs)
                if owner._recording:
                    append(output)
                    versions[index] += output._version
                return output
        else:
            def forward(self_, *args, **kwargs):
                output = inner(*args, **kwargs)
                if owner._recording:
                    append(output)
                    versions[index] += output._version
                return output

        self.forward = module.forward = types.MethodType(forward, module)

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is not self.forward:
            return  # wrapped again since (another tap): that one restores ours; ours appends only while recording
        if self.previous is not None:
            self.module.forward = self.previous
        else:
            del self.module.forward


class _ParamSet:
    """Parameters stepped together (the network's, or one optimizer's of several): their names,
    tags and statistics objects, made once per set."""

    def __init__(self, named: list[tuple[str, torch.Tensor]], update_ratio: bool):
        self.named = named
        self.names = tuple(n for n, _ in named)
        self.params = [p for _, p in named]
        sizes = [p.numel() for p in self.params]
        self.grad_stats = GradientStats(sizes)
        self.update = UpdateRatio(sizes) if update_ratio else None
        self.grad_tags = tuple(tags.grad(n, stat) for n in self.names for stat in tags.GRAD_STATS) + (tags.GLOBAL_NORM,)
        self.update_tags = tuple(tags.update(n) for n in self.names)
        self.carry_step: int | None = None  # the step whose weights before it the last step kept


class GradientTelemetry(pl.Callback):
    """Logs `grad/<param>/<stat>`, `grad/global_norm`, `act/<layer>/...` and `update/<param>/ratio`
    every `every_n_steps` optimizer steps, in any Lightning project, into every logger the
    Trainer has (docs/callback.md).

    Gradients are read in `on_before_optimizer_step` (after accumulation and AMP unscaling, before
    clipping and the update), the weights there and again right after the optimizer's step (a
    step hook on the optimizer: with several optimizers each step is its own), for the update
    ratio; when every step logs, the weights read after one step are the next step's weights
    before it. With several optimizers (manual optimization) a step's statistics are those of
    the parameters its optimizer steps. Activations come from a tap on each ReLU module's forward
    (`_OutputTap`), keyed by module: the calls since the last optimizer step (every micro-batch of
    an accumulated step) are concatenated along the batch dimension, so a unit is dead only if it
    fired in none of them; for a convolution's (N, C, H, W) output a unit is a channel. An output
    changed in place after the ReLU (a later in-place op) is detected and its layer left out of
    that step, with one warning. When logging every N > 1 steps the taps exist only while a
    logged step gathers. A step's numbers stay on the device until its end and come to the host
    in one copy: on a GPU without waiting (read when a later step ends, `StepRecorder`); float32
    CPU tensors go through fused kernels (`telemetry.kernels`) that leave the numbers on the host.

    Example, in your own project (the callback writes into the Trainer's loggers)::

        from gradwatch import GradientTelemetry
        Trainer(callbacks=[GradientTelemetry()], logger=TensorBoardLogger("logs"))

    Inside gradwatch's pipeline it is handed the run's recorder::

        recorder = StepRecorder(tb_dir, metrics_dir)
        Trainer(callbacks=[GradientTelemetry(recorder, every_n_steps=10), recorder])

    Args (defaults: conf/telemetry/default.yaml):
        recorder: where the numbers go; None: a recorder of its own, writing TensorBoard's events
            into the TensorBoardLogger's `log_dir` and every other logger's through `log_metrics`.
        every_n_steps: log optimizer steps 0, n, 2n, ...
        activations: record dead/zero fractions of ReLU layers.
        on_nonfinite: `warn` (one line per parameter, training goes on) or `stop` (skip that
            step's update and end the run as diverged; this reads the gradients' statistics
            before the update, a blocking read on logged steps).
        histograms_every_n_steps: also write gradient histograms this often (0: never).
        update_ratio: log `update/<param>/ratio`; False keeps no copy of the weights.
    """

    def __init__(self, recorder: StepRecorder | None = None, every_n_steps: int = DEFAULTS["every_n_steps"],
                 activations: bool = DEFAULTS["activations"], on_nonfinite: str = DEFAULTS["on_nonfinite"],
                 histograms_every_n_steps: int = DEFAULTS["histograms_every_n_steps"],
                 update_ratio: bool = DEFAULTS["update_ratio"]):
        for key, value in (("every_n_steps", every_n_steps), ("activations", activations),
                           ("histograms_every_n_steps", histograms_every_n_steps), ("update_ratio", update_ratio)):
            check(f"telemetry.{key}", value, name=key)
        if on_nonfinite not in ON_NONFINITE:
            raise ConfigError("on_nonfinite", on_nonfinite, "one of " + ", ".join(ON_NONFINITE))
        if recorder is not None and not callable(getattr(recorder, "add", None)):
            raise ConfigError("recorder", type(recorder).__name__, "a StepRecorder, or None for one of its own")
        self.recorder = recorder
        self.every_n_steps = every_n_steps
        self.activations = activations
        self.on_nonfinite = on_nonfinite
        self.histograms_every_n_steps = histograms_every_n_steps
        self.update_ratio = update_ratio
        self._own_recorder = recorder is None
        # Distinct settings, distinct keys: Lightning then lets `setup` say how to combine them.
        # Made once: Lightning reads it for every hook call (its profiler's action names).
        self._state_key = self._generate_state_key(every_n_steps=every_n_steps, activations=activations,
                                                   histograms_every_n_steps=histograms_every_n_steps,
                                                   update_ratio=update_ratio)
        self.divergence: dict | None = None  # why the run stopped or diverged (kept after fit)
        self._fired_epoch: torch.Tensor | None = None
        self._reset()

    @property
    def state_key(self) -> str:
        return self._state_key

    def _reset(self) -> None:
        """Everything a fit builds, dropped: after fit nothing of the model's size stays held."""
        self._disabled = False
        self._warned: set[str] = set()
        self._recording = False
        self._hooks: list[_OutputTap] = []
        self._step_hooks: list = []
        self._layers: list[tuple[str, nn.Module]] = []
        self._calls: list[list[torch.Tensor]] = []
        self._versions: list[int] = []  # per layer: the versions its recorded outputs had, summed (`_OutputTap`)
        self._no_versions: tuple[int, ...] = ()
        self._calls_step: int | None = None  # the optimizer step the calls gathered belong to
        self._every_layer: tuple[int, ...] = ()
        self._step: int | None = None  # a logged step whose update is not measured yet
        self._last_batch = False  # this batch ends the epoch
        self._set: _ParamSet | None = None  # of `_step`
        self._pending: list[tuple[torch.Tensor | np.ndarray, Callable[[np.ndarray], np.ndarray] | None]] = []
        self._pending_tags: list[tuple[str, ...]] = []
        self._check: tuple | None = None  # (step, names) of the gradients pending, for the non-finite check
        self._kept: torch.Tensor | np.ndarray | None = None
        self._world_size: int | None = None  # the processes of this fit (as the recorder's)
        self._single_optimizer = True
        self._carry = self.every_n_steps == 1  # the weights after a step kept as the next one's before it
        self._network_params: list[tuple[str, torch.Tensor]] | None = None  # per fit, in named_parameters order
        self._network_tensors: list[torch.Tensor] = []
        self._candidates: dict = {}  # per optimizer (several): its parameters, in the network's order
        self._grads: list[torch.Tensor] = []  # this step's, of the set's parameters
        self._param_sets: dict[tuple[str, ...], _ParamSet] = {}
        self._last_named: list | None = None  # the `named` list `_set` was found for
        self._act_stats: dict[tuple, tuple[ActivationStats, tuple[str, ...], list[int]]] = {}
        self._last_act: tuple = (None, None)  # the last step's key into `_act_stats`, and its entry
        self._epoch_layers: list[int] | None = None
        self._epoch_stats: ActivationStats | None = None
        self._epoch_parts: tuple[int, ...] | None = None  # per layer, its widths' rows (None: one each)
        self._epoch_tags: dict[tuple[int, ...], tuple[str, ...]] = {}
        self._last_epoch: tuple = (None, ())  # the last epoch's `_epoch_layers` list, and its tags
        self._names = JoinedNames()
        self._trainer = None

    # -- setup: the Trainer checked, the recorder of its own ------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self._refuse_what_cannot_work(trainer)
        if not self._own_recorder or self.recorder is not None:
            return
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers = list(trainer.loggers)
        if not loggers:
            self._disabled = True
            if trainer.is_global_zero:
                log.warning("GradientTelemetry: the Trainer has no logger, so nothing is recorded; give it one: "
                            "Trainer(logger=TensorBoardLogger('logs'), ...) or any other Lightning logger")
            return
        tb = next((lg for lg in loggers if isinstance(lg, TensorBoardLogger)), None)
        self.recorder = StepRecorder(None if tb is None else tb.log_dir, loggers=[lg for lg in loggers if lg is not tb],
                                     on_nonfinite_loss=self.on_nonfinite)

    def _refuse_what_cannot_work(self, trainer) -> None:
        """One line for what this callback cannot do right, before any work."""
        others = [cb for cb in trainer.callbacks if isinstance(cb, GradientTelemetry) and cb is not self]
        if others:
            raise MisconfigurationException(
                f"GradientTelemetry: {len(others) + 1} instances in one Trainer would write the same tags; use one "
                "that takes every schedule, e.g. GradientTelemetry(every_n_steps=1, histograms_every_n_steps=100)")
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

        # Strategies that shard parameters and gradients: a process holds part of each tensor.
        if isinstance(trainer.strategy, FSDPStrategy | DeepSpeedStrategy | ModelParallelStrategy):
            raise MisconfigurationException(
                f"GradientTelemetry: {type(trainer.strategy).__name__} shards parameters and gradients across "
                "processes, so each sees a part of them; use a strategy that keeps whole parameters (ddp, one device)")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self._release()

    def _release(self) -> None:
        self._remove_hooks()
        if getattr(self.recorder, "divergence", None) is not None:
            self.divergence = dict(self.recorder.divergence)
        if self._own_recorder and self.recorder is not None:
            self.recorder.close()
            self.recorder = None
        self._fired_epoch = None
        self._reset()

    # -- when ----------------------------------------------------------------------------------
    def _logs(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def on_fit_start(self, trainer, pl_module) -> None:
        if self._disabled:
            return
        if self._own_recorder:
            self.recorder.on_fit_start(trainer, pl_module)
        self._trainer = trainer
        network = network_of(pl_module)
        self._world_size = None
        self._network_params = list(network.named_parameters())
        self._network_tensors = [p for _, p in self._network_params]
        optimizers = [getattr(opt, "_optimizer", opt) for opt in trainer.optimizers]
        self._single_optimizer = len(optimizers) <= 1
        self._carry = self.every_n_steps == 1 and self._single_optimizer
        self._step_hooks = [opt.register_step_post_hook(self._after_optimizer_step) for opt in optimizers]
        self._layers = relu_layers(network) if self.activations else []
        self._calls = [[] for _ in self._layers]
        self._versions = [0] * len(self._layers)
        self._no_versions = (0,) * len(self._layers)
        self._every_layer = tuple(range(len(self._layers)))
        if self.activations and trainer.is_global_zero:
            self._say_what_is_not_watched(network)
        if self.every_n_steps == 1 and self._layers:
            self._add_hooks()  # every step logs: keep them for the whole fit
        # Written on every fit, resumes included: TensorBoard keeps the latest layout.
        params = [n for n, p in network.named_parameters() if p.requires_grad]
        self.recorder.add_layout(tags.custom_scalars_layout(params, [n for n, _ in self._layers]))

    def _say_what_is_not_watched(self, network: nn.Module) -> None:
        unwatched: dict[str, list[str]] = {}
        for name, module in network.named_modules():
            if isinstance(module, OTHER_ACTIVATIONS) and not isinstance(module, DEAD_UNIT_MODULES):
                unwatched.setdefault(type(module).__name__, []).append(name)
        if not unwatched and (self._layers or not self._own_recorder):
            return
        listed = "; ".join(f"{kind} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                           for kind, names in unwatched.items())
        log.warning("GradientTelemetry: act/ tags cover nn.ReLU and nn.ReLU6 modules only (%d here)%s; "
                    "activations called as functions (F.relu, torch.relu) are not seen", len(self._layers),
                    f"; not watched: {listed}" if listed else "")

    def _add_hooks(self) -> None:
        self._hooks = [_OutputTap(module, calls, self, self._versions, i)
                       for i, ((_, module), calls) in enumerate(zip(self._layers, self._calls, strict=True))]

    def _remove_hooks(self) -> None:
        self._remove_taps()
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks = []

    def _remove_taps(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _clear_calls(self) -> None:
        list(map(list.clear, self._calls))
        self._versions[:] = self._no_versions  # in place: the taps hold this list

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._disabled:
            return
        step = trainer.global_step
        self._last_batch = batch_idx + 1 >= trainer.num_training_batches
        if self._calls_step != step:  # a new step: what earlier batches gathered is not its own
            self._clear_calls()
            self._calls_step = step
        self._recording = bool(self._layers) and self._logs(step)
        if self._recording and not self._hooks:  # added once, whatever the micro-batches
            self._add_hooks()

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if self._own_recorder and not self._disabled:
            self.recorder.on_before_backward(trainer, pl_module, loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._disabled:
            return
        if self._step is not None:  # an earlier step whose optimizer did not step (AMP skipped it)
            self._after_optimizer_step()
        step = trainer.global_step
        # The forward passes after this step (manual optimization) belong to the next one.
        every = self.every_n_steps
        logged, self._recording = step % every == 0, bool(self._layers) and (step + 1) % every == 0
        if self._recording and not self._hooks:
            self._add_hooks()
        if not logged:
            self._clear_calls()
            self._calls_step = step + 1
            return
        named = self._with_gradients(getattr(optimizer, "_optimizer", optimizer))
        if named:
            self._add_gradient_stats(named, step)
        if any(self._calls):
            self._add_activation_stats()
        self._clear_calls()
        self._calls_step = step + 1
        if self.histograms_every_n_steps and step % self.histograms_every_n_steps == 0:
            for name, param in named:
                self.recorder.add_histogram(tags.grad_histogram(name), param.grad.detach(), step)
        self._step = step
        if named and self.on_nonfinite == "stop":
            # The update must not happen with a non-finite gradient: decide now, on the host.
            names, values = self._step_names(), on_host(self._pending)
            if values is None:
                values = Readback(self._pending, defer=False).result()
            self._pending, self._pending_tags = [], []
            checked, self._check = self._check, None
            self.recorder.add(names, values, step=step)
            self._check_finite(trainer, checked, values)

    def _after_optimizer_step(self, *_) -> None:
        """The end of a logged step (the optimizer's step hook, or the hooks after it): the update
        ratio measured, the step's numbers handed to the recorder."""
        step, self._step = self._step, None
        if step is None:
            return
        entry = self._set
        if self._kept is not None:
            # Every step logs (one optimizer): the weights now are the next step's weights before it.
            carry = self._carry
            self._pending.append(entry.update.pending(self._kept, entry.params, carry=carry))
            entry.carry_step = step + 1 if carry else None
            self._pending_tags.append(entry.update_tags)
            self._kept = None
        if self._last_batch and self._fired_epoch is not None:
            self._add_epoch_dead_fraction()
        # The gradients are let go now: the next backward can reuse their memory (held until the
        # next step, every step would allocate afresh: ~30 us more a step on a 100-tensor net).
        self._grads = []
        self._hand_over(step)

    def _hand_over(self, step: int) -> None:
        pending = self._pending
        if not pending:
            return
        names = self._step_names()
        self._pending, self._pending_tags = [], []
        checked, self._check = self._check, None
        trainer = self._trainer
        # The CPU kernels leave every number on the host: joined at once, no Readback made.
        values = on_host(pending)
        if values is None:
            readback = Readback(pending, getattr(self.recorder, "defer", None))
            if not readback.deferred:
                values = readback.result()
        if values is not None:  # read now (the CPU): the recorder gets numbers, checked here
            self.recorder.add(names, values, step=step)
            if checked is not None and self.on_nonfinite == "warn":
                self._check_finite(trainer, checked, values)
            return
        on_read = None
        if checked is not None and self.on_nonfinite == "warn":
            def on_read(values, checked=checked):
                self._check_finite(trainer, checked, values)
        self.recorder.add(names, readback, step=step, on_read=on_read)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._disabled:
            return
        if self._step is not None:  # usually handed over already, by the optimizer's step hook
            self._after_optimizer_step()
        self._recording = False  # a validation loop next is not a training step's
        if self._last_batch and self._fired_epoch is not None and not self._logs(trainer.global_step - 1):
            self._add_epoch_dead_fraction()  # the epoch ends on a step that is not logged
            self._hand_over(trainer.global_step - 1)
        if self.every_n_steps > 1 and self._hooks and not self._logs(trainer.global_step):
            self._remove_taps()  # removed once, when the next step does not log
        if self._own_recorder:
            self.recorder.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._own_recorder and self.recorder is not None:
            self.recorder.on_load_checkpoint(trainer, pl_module, checkpoint)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._own_recorder and self.recorder is not None:
            self.recorder.on_save_checkpoint(trainer, pl_module, checkpoint)

    def state_dict(self) -> dict:
        # The units that fired so far this epoch, so a mid-epoch resume counts the whole epoch.
        # A copy: on a CPU the mask is OR-ed in place at the next step.
        return {"fired_epoch": None if self._fired_epoch is None else self._fired_epoch.to("cpu", copy=True)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._fired_epoch = state_dict.get("fired_epoch")
        self._epoch_layers = self._epoch_stats = None

    def on_train_end(self, trainer, pl_module) -> None:
        if self._disabled:
            return
        self._after_optimizer_step()
        self._remove_hooks()
        if self._own_recorder:
            self.recorder.on_train_end(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._own_recorder and self.recorder is not None:
            self.recorder.on_exception(trainer, pl_module, exception)
        self._release()

    # -- what -----------------------------------------------------------------------------------
    def _with_gradients(self, optimizer) -> list[tuple[str, torch.Tensor]]:
        """The (name, parameter) pairs that have a gradient this step: every parameter of the
        network (one optimizer), or those of the optimizer stepping (several), usually as one
        cached list (the statistics objects are found by it); their gradients go to `_grads`."""
        if self._network_params is None:  # called outside a fit
            self._network_params = list(self._network_of_trainer().named_parameters())
            self._network_tensors = [p for _, p in self._network_params]
        if self._single_optimizer:
            candidates, tensors = self._network_params, self._network_tensors
        else:
            entry = self._candidates.get(optimizer)
            if entry is None:
                owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
                named = [(n, p) for n, p in self._network_params if id(p) in owned]
                entry = self._candidates[optimizer] = named, [p for _, p in named]
            candidates, tensors = entry
        grads = list(map(_GRAD, tensors))
        if all(map(operator.is_not, grads, itertools.repeat(None))):  # not `None in`: that calls Tensor.__eq__
            self._grads = grads
            return candidates
        named = [(n, p) for n, p in candidates if p.grad is not None]
        self._grads = [p.grad for _, p in named]
        return named

    def _network_of_trainer(self) -> nn.Module:
        return network_of(self._trainer.lightning_module)

    def _add_gradient_stats(self, named: list[tuple[str, torch.Tensor]], step: int) -> None:
        if named is not self._last_named:  # usually the same cached list, step after step
            key = tuple(n for n, _ in named)
            entry = self._param_sets.get(key)
            if entry is None:
                entry = self._param_sets[key] = _ParamSet(named, self.update_ratio)
            self._set, self._last_named = entry, named
        entry = self._set
        if entry.update is not None:
            # A copy, read under no_grad (no detach needed), or the one the last step carried over.
            self._kept = entry.update.before(entry.params, reuse=entry.carry_step == step)
        # Per-parameter rows, then the global norm. Weights the CPU kernels took (kept in numpy)
        # vouch for their gradients' dtype, device and size: autograd keeps them those of the weight.
        self._pending.append(entry.grad_stats.pending(self._grads, checked=isinstance(self._kept, np.ndarray)))
        self._pending_tags.append(entry.grad_tags)
        # The gradient rows are the step's first group (nothing is pending before them): the
        # non-finite check reads them from the start of the step's values.
        self._check = (step, entry.names if len(named) == len(entry.names) else tuple(n for n, _ in named))

    def _changed_in_place(self) -> list[int]:
        """The layers one of whose outputs was modified in place after the tap read it (its
        version counter moved): their numbers would describe what the later op made of them."""
        # Versions only grow: a layer's outputs' versions sum to what they summed to when recorded
        # (`_OutputTap`) only if none of them moved.
        return [i for i, (made, recorded) in enumerate(zip(self._calls, self._versions, strict=True))
                if sum(map(_VERSION, made)) != recorded]

    def _add_activation_stats(self) -> None:
        calls = self._calls
        if list(map(len, calls)).count(1) == len(calls):  # every layer called once (C loops: ~49 layers)
            outputs = list(map(_FIRST, calls))
            # One sum over every layer for the usual case, nothing changed (versions only grow).
            changed = [] if sum(map(_VERSION, outputs)) == sum(self._versions) else self._changed_in_place()
            present = self._every_layer
            if changed:
                present = tuple(i for i in present if i not in changed)
                outputs = [outputs[i] for i in present]
            shapes = tuple(map(_SHAPE, outputs))
            parts = None
        else:
            changed = self._changed_in_place()
            present = tuple(i for i, made in enumerate(calls) if made and i not in changed)
            # One call: its output as it is; several: on a GPU the calls as they are, each counted
            # where it lies, on the CPU concatenated (`unit_view`) for the counts. A module called
            # on outputs of several widths (a `self.relu` shared by layers of several widths) is
            # one layer per width here (`by_units`), whose rows `ActivationStats.merged` joins.
            apart = bool(present) and counts_calls_apart(calls[present[0]][0].device)
            outputs, parts = [], []
            for i in present:
                made = calls[i]
                groups = (made,) if len(made) == 1 else by_units(made)
                outputs += [group[0] if len(group) == 1 else tuple(group) if apart else unit_view(group)
                            for group in groups]
                parts.append(len(groups))
            parts = None if len(parts) == len(outputs) else tuple(parts)
            shapes = tuple(map(unit_shape, outputs))
        if changed:
            self._say_changed(changed)
        if not present:
            return
        key = (present, shapes)
        if key == self._last_act[0]:  # the last step's layers and shapes: no hashing of ~49 shapes
            entry = self._last_act[1]
        else:
            entry = self._act_stats.get(key)
            if entry is None:
                act_tags = tuple(tags.act(self._layers[i][0], stat) for i in present for stat in tags.ACT_STATS)
                entry = self._act_stats[key] = (ActivationStats(list(shapes)), act_tags, list(present), parts)
            self._last_act = key, entry
        stats, act_tags, present, parts = entry
        # The units that fired earlier in this epoch, if any (None: a new epoch, or a checkpoint
        # from another model); `pending` adds this step's.
        earlier = self._fired_epoch
        if earlier is not None and (self._epoch_layers not in (None, present)  # None: state from a checkpoint
                                    or earlier.shape != (stats.unit_total,)):
            earlier = None
        # The outputs have the shapes `stats` was made for (the key): `checked`.
        if self._world_size is None:  # once a fit: the processes are set up before it starts
            self._world_size = world()[1]
        combine = combine_unit_counts if self._world_size > 1 else None
        values, finish, self._fired_epoch = stats.pending(outputs, combine, earlier, checked=True)
        if parts is not None:  # several widths of a module: one row for it
            if finish is None:  # the CPU kernels' rows, on the host
                values, finish = stats.merged(values, parts), None
            else:
                finish = functools.partial(_merged_rows, stats, finish, parts)
        self._pending.append((values, finish))
        self._pending_tags.append(act_tags)
        self._epoch_layers, self._epoch_stats, self._epoch_parts = present, stats, parts

    def _say_changed(self, changed: list[int]) -> None:
        new = [self._layers[i][0] for i in changed if f"inplace:{i}" not in self._warned]
        self._warned.update(f"inplace:{i}" for i in changed)
        if new:
            log.warning("GradientTelemetry: the output of ReLU layer %s was modified in place after it (an in-place "
                        "op such as x.add_() or Dropout(inplace=True) follows it), so its act/ numbers would describe "
                        "the modified values; left out of the steps where this happens", ", ".join(new))

    def _add_epoch_dead_fraction(self) -> None:
        fired, self._fired_epoch = self._fired_epoch, None
        if self._epoch_stats is None:  # resumed on an epoch's last batch, nothing logged since
            return
        never_fired = self._epoch_stats.epoch_pending(fired)
        if isinstance(never_fired, torch.Tensor) and never_fired.is_cpu:
            never_fired = never_fired.numpy()
        parts = self._epoch_parts
        if parts is None:
            self._pending.append((never_fired, None))
        elif isinstance(never_fired, np.ndarray):
            self._pending.append((self._epoch_stats.merged_epoch(never_fired, parts), None))
        else:
            self._pending.append((never_fired, functools.partial(self._epoch_stats.merged_epoch, parts=parts)))
        layers = self._epoch_layers
        # Usually the same list as the last epoch's: one per set of layers, made once with its
        # `_act_stats` entry and never changed (held here, so its id is not reused): no tuple
        # of every layer's index made and hashed at each epoch's end (each step, with one-batch epochs).
        if layers is self._last_epoch[0]:
            epoch_tags = self._last_epoch[1]
        else:
            key = tuple(layers)
            epoch_tags = self._epoch_tags.get(key)
            if epoch_tags is None:  # one tuple object per set of layers: the names cache keys by identity
                epoch_tags = self._epoch_tags[key] = tuple(tags.act(self._layers[i][0], tags.ACT_EPOCH) for i in key)
            self._last_epoch = layers, epoch_tags
        self._pending_tags.append(epoch_tags)

    def _step_names(self) -> tuple[str, ...]:
        """This step's tags, one tuple object per combination (the recorder caches by it)."""
        return self._names.join(self._pending_tags)

    def _check_finite(self, trainer, checked: tuple | None, values: np.ndarray) -> None:
        """`checked`: (step, parameter names) of the gradient rows at the start of `values`."""
        if checked is None:
            return
        step, names = checked
        grad_values = values[: len(names) * len(tags.GRAD_STATS) + 1]
        # A finite global norm (last) means every gradient is finite: one number, not a column.
        # (An infinite one may still come from finite float64 gradients above ~1e154: count.)
        if math.isfinite(grad_values[-1]):
            return
        counts = grad_values[_NONFINITE:-1:len(tags.GRAD_STATS)]  # the rows' nonfinite column
        if not counts.any():
            return
        bad = [f"{name} ({int(count)} values)" for name, count in zip(names, counts, strict=True) if count > 0]
        reason = f"non-finite gradient at step {step} in {', '.join(bad)}"
        if self.on_nonfinite == "stop":
            # Drop the gradients so this step's update leaves the weights (and last.ckpt) finite.
            for param in network_of(trainer.lightning_module).parameters():
                param.grad = None
            self.recorder.diverge(step, reason, trainer)
            log.warning("GradientTelemetry: %s; that step's update skipped and training stopped (on_nonfinite=stop)",
                        reason)
            return
        self.recorder.diverge(step, reason, trainer, stop=False)
        new = [entry for entry, name in zip(bad, (b.split(" (")[0] for b in bad), strict=True)
               if name not in self._warned]
        if new:
            self._warned.update(b.split(" (")[0] for b in new)
            log.warning("GradientTelemetry: non-finite gradient at step %d in %s; logged, training goes on "
                        "(on_nonfinite=warn)", step, ", ".join(new))
