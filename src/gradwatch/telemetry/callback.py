"""The telemetry callback: gradient statistics, dead-ReLU rates and update ratios, every N steps.

"What" lives in `gradwatch.telemetry.stats`; this adapter decides "when" and hands the numbers to a
`StepRecorder`, which writes them with the step's loss as one event. Inside gradwatch's pipeline
the recorder is given; in any other Lightning project the callback makes its own, in the folder of
the Trainer's TensorBoardLogger.
"""

import itertools
import logging
import math
import operator
import types
from collections.abc import Callable

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from gradwatch.config.errors import ConfigError, check_int
from gradwatch.telemetry import tags
from gradwatch.telemetry.distributed import combine_unit_counts, world
from gradwatch.telemetry.recorder import StepRecorder
from gradwatch.telemetry.stats import ActivationStats, GradientStats, UpdateRatio, unit_view

log = logging.getLogger(__name__)

ON_NONFINITE = ("warn", "stop")
DEAD_UNIT_MODULES = (nn.ReLU, nn.ReLU6)
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
    """Appends each output of `module` to `calls` while `owner._recording` is true, by wrapping
    its `forward` on the instance, until `remove()`. A forward hook would do the same, but any
    hook sends every call of the module through `Module._call_impl`'s slow path: measured 2-3 us
    more per call, 0.1-0.3 ms a step on a 50-layer net, the largest part of the activations' cost
    there; the wrapper is one Python frame (the test inline, not a call: ~0.3 us a call less in a
    training step). The wrapper is a bound method, so a deep copy of the module (an EMA copy, say)
    calls its own forward."""

    def __init__(self, module: nn.Module, calls: list, owner: "GradientTelemetry"):
        self.module = module
        self.previous = module.__dict__.get("forward")  # a forward already set on the instance
        inner = self.previous
        append = calls.append

        if inner is None and type(module).forward is nn.ReLU.forward:
            # nn.ReLU's own forward inline: one frame and no argument packing less a call, on
            # every ReLU call of a step (F.relu is what nn.ReLU.forward calls).
            relu = nn.functional.relu

            def forward(self_, input):
                output = relu(input, inplace=self_.inplace)
                if owner._recording:
                    append(output)
                return output
        elif inner is None:
            def forward(self_, *args, **kwargs):
                output = type(self_).forward(self_, *args, **kwargs)
                if owner._recording:
                    append(output)
                return output
        else:
            def forward(self_, *args, **kwargs):
                output = inner(*args, **kwargs)
                if owner._recording:
                    append(output)
                return output

        self.forward = module.forward = types.MethodType(forward, module)

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is not self.forward:
            return  # wrapped again since (another tap): that one restores ours; ours appends only while recording
        if self.previous is not None:
            self.module.forward = self.previous
        else:
            del self.module.forward


class GradientTelemetry(pl.Callback):
    """Logs `grad/<param>/<stat>`, `grad/global_norm`, `act/<layer>/...` and `update/<param>/ratio`
    every `every_n_steps`, in any Lightning project.

    Gradients are read in `on_before_optimizer_step` (after accumulation and AMP unscaling, before
    clipping and the update), the weights there and again in `on_train_batch_end` (the update
    ratio; when every step logs, the weights read at one step's end are the next step's weights
    before it, so a change made between two steps counts in the second). Activations come
    from a tap on each ReLU module's forward (`_OutputTap`), keyed by module: a module
    called several times in a step has its calls concatenated along the batch dimension, so a unit
    is dead only if it fired in none of them; for a convolution's (N, C, H, W) output a unit is a
    channel. When logging every N > 1 steps the taps exist only on the steps that log. The
    numbers of a step stay on the device until its end and come to the host in one transfer,
    where the per-row arithmetic is done; float32 CPU tensors go through fused kernels
    (`telemetry.kernels`) that read them in place and leave the numbers on the host. Buffers kept
    across steps: on a CPU with float32 weights, one float32 copy of the weights (the update
    ratio); elsewhere (GPU, half precision), to keep a step to a few dozen tensor operations,
    about 11 float32 copies of the parameters (gradient stacks and work rows, float64 weights
    before and after) and one copy of the ReLU outputs.

    Example, in your own project (the callback writes into the logger's folder)::

        from gradwatch import GradientTelemetry
        Trainer(callbacks=[GradientTelemetry()], logger=TensorBoardLogger("logs"))

    Inside gradwatch's pipeline it is handed the run's recorder::

        recorder = StepRecorder(tb_dir, metrics_dir)
        Trainer(callbacks=[GradientTelemetry(recorder, every_n_steps=10), recorder])

    Args:
        recorder: where the numbers go; None: a recorder of its own in the TensorBoardLogger's
            `log_dir`, driven by this callback.
        every_n_steps: log on steps 0, n, 2n, ...
        activations: record dead/zero fractions of ReLU layers.
        on_nonfinite: `warn` (log it, warn once per parameter) or `stop` (end the run as diverged;
            this reads the statistics before the update, a second transfer on logged steps).
        histograms_every_n_steps: also write gradient histograms this often (0: never).
    """

    def __init__(self, recorder: StepRecorder | None = None, every_n_steps: int = 1, activations: bool = True,
                 on_nonfinite: str = "warn", histograms_every_n_steps: int = 0):
        check_int("every_n_steps", every_n_steps, minimum=1)
        check_int("histograms_every_n_steps", histograms_every_n_steps, minimum=0, allowed="an integer >= 0 (0: never)")
        if on_nonfinite not in ON_NONFINITE:
            raise ConfigError("on_nonfinite", on_nonfinite, "one of " + ", ".join(ON_NONFINITE))
        if not isinstance(activations, bool):
            raise ConfigError("activations", activations, "true or false")
        if recorder is not None and not callable(getattr(recorder, "add", None)):
            raise ConfigError("recorder", type(recorder).__name__, "a StepRecorder, or None for one of its own")
        self.recorder = recorder
        self.every_n_steps = every_n_steps
        self.activations = activations
        self.on_nonfinite = on_nonfinite
        self.histograms_every_n_steps = histograms_every_n_steps
        self._own_recorder = recorder is None
        self._disabled = False
        self._warned: set[str] = set()
        self._active = False
        self._recording = False
        self._hooks: list = []
        self._layers: list[tuple[str, nn.Module]] = []
        self._calls: list[list[torch.Tensor]] = []
        self._every_layer: tuple[int, ...] = ()
        self._step: int | None = None
        self._named: list[tuple[str, torch.Tensor]] = []
        # This step's numbers on the device, each with what turns it into values on the host.
        self._pending: list[tuple[torch.Tensor, Callable[[np.ndarray], np.ndarray] | None]] = []
        self._pending_tags: list[tuple[str, ...]] = []
        self._kept: list[torch.Tensor] | None = None
        self._carry_step: int | None = None  # the step whose weights before it the last step kept
        self._world_size: int | None = None  # the processes of this fit (as the recorder's)
        self._params: list[torch.Tensor] = []
        self._network_params: list[tuple[str, torch.Tensor]] | None = None  # per fit, in named_parameters order
        self._network_tensors: list[torch.Tensor] = []
        self._grads: list[torch.Tensor] = []  # this step's, of `_named`
        self._grad_key: tuple[str, ...] | None = None
        self._grad_list: list | None = None  # the `named` list `_params` was taken from
        self._grad_stats: GradientStats | None = None
        self._update: UpdateRatio | None = None
        self._grad_tags: tuple[str, ...] = ()
        self._update_tags: tuple[str, ...] = ()
        self._act_stats: dict[tuple, tuple[ActivationStats, tuple[str, ...], list[int]]] = {}
        self._last_act: tuple = (None, None)  # the last step's key into `_act_stats`, and its entry
        self._epoch_layers: list[int] | None = None
        self._epoch_stats: ActivationStats | None = None
        self._epoch_tags: dict[tuple[int, ...], tuple[str, ...]] = {}
        self._fired_epoch: torch.Tensor | None = None
        self._names_cache: dict[tuple, tuple[tuple[str, ...], tuple]] = {}

    # -- setup: the recorder of its own, in any Lightning project -------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or not self._own_recorder or self.recorder is not None:
            return
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None:
            self._disabled = True
            if trainer.is_global_zero:
                log.warning("GradientTelemetry: no TensorBoardLogger in the Trainer's loggers, so nothing is "
                            "recorded; add one: Trainer(logger=TensorBoardLogger('logs'), ...)")
            return
        self._disabled = not trainer.is_global_zero  # one process writes
        if not self._disabled:
            self.recorder = StepRecorder(tb_dir=logger.log_dir)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._own_recorder and self.recorder is not None:
            self.recorder.close()
            self.recorder = None

    # -- when ----------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        if self._disabled:
            return
        if self._own_recorder:
            self.recorder.on_fit_start(trainer, pl_module)
        network = network_of(pl_module)
        self._carry_step = self._world_size = None
        self._network_params = list(network.named_parameters())
        self._network_tensors = [p for _, p in self._network_params]
        self._layers = relu_layers(network) if self.activations else []
        self._calls = [[] for _ in self._layers]
        self._every_layer = tuple(range(len(self._layers)))
        if self.every_n_steps == 1:
            self._add_hooks()  # every step logs: keep them for the whole fit
        # Written on every fit, resumes included: TensorBoard keeps the latest layout.
        params = [n for n, p in network.named_parameters() if p.requires_grad]
        self.recorder.add_layout(tags.custom_scalars_layout(params, [n for n, _ in self._layers]))

    def _add_hooks(self) -> None:
        self._hooks = [_OutputTap(module, calls, self) for (_, module), calls in zip(self._layers, self._calls,
                                                                                      strict=True)]

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._active = not self._disabled and trainer.global_step % self.every_n_steps == 0
        list(map(list.clear, self._calls))
        self._recording = self._active
        if self._active and self.every_n_steps > 1:
            self._add_hooks()

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if self._own_recorder and not self._disabled:
            self.recorder.on_before_backward(trainer, pl_module, loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._active:
            return
        self._active = self._recording = False
        if self.every_n_steps > 1:
            self._remove_hooks()
        self._step = step = trainer.global_step
        named = self._named = self._with_gradients(pl_module)
        if named:
            self._add_gradient_stats(named)
        if any(self._calls):
            self._add_activation_stats()
        if self.histograms_every_n_steps and step % self.histograms_every_n_steps == 0:
            for name, param in named:
                self.recorder.add_histogram(tags.grad_histogram(name), param.grad.detach(), step)
        if named and self.on_nonfinite == "stop":
            # The update must not happen with a non-finite gradient: decide now, on the host.
            names, values = self._step_names(), self._transfer()
            self.recorder.add(names, values)
            self._check_finite(trainer, step, values[: len(self._grad_tags)])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._step is not None:
            self._finish_step(trainer, batch_idx)
        elif self._fired_epoch is not None and batch_idx + 1 >= trainer.num_training_batches:
            self._add_epoch_dead_fraction()
            self.recorder.add(self._step_names(), self._transfer())
        if self._own_recorder and not self._disabled:
            self.recorder.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _finish_step(self, trainer, batch_idx: int) -> None:
        step, self._step = self._step, None
        if self._kept is not None:
            # Every step logs: the weights now are the next step's weights before it (`carry`).
            carry = self.every_n_steps == 1
            self._pending.append(self._update.pending(self._kept, self._params, carry=carry))
            self._carry_step = step + 1 if carry else None
            self._pending_tags.append(self._update_tags)
            self._kept = None
        if self._fired_epoch is not None and batch_idx + 1 >= trainer.num_training_batches:
            self._add_epoch_dead_fraction()
        names, values = self._step_names(), self._transfer()  # the step's one device-to-host transfer
        self.recorder.add(names, values)
        if self._named and self.on_nonfinite == "warn":
            self._check_finite(trainer, step, values[: len(self._grad_tags)])
        self._named, self._grads = [], []

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
        self._remove_hooks()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._remove_hooks()
        if self._own_recorder and self.recorder is not None:
            self.recorder.on_exception(trainer, pl_module, exception)
            self.recorder.close()
            self.recorder = None

    # -- what -----------------------------------------------------------------------------------
    def _with_gradients(self, pl_module) -> list[tuple[str, torch.Tensor]]:
        """The (name, parameter) pairs that have a gradient this step: every parameter of the
        network, usually, as one cached list (the statistics objects are cached by it); their
        gradients go to `_grads`."""
        if self._network_params is None:  # called outside a fit
            self._network_params = list(network_of(pl_module).named_parameters())
            self._network_tensors = [p for _, p in self._network_params]
        grads = list(map(_GRAD, self._network_tensors))
        if all(map(operator.is_not, grads, itertools.repeat(None))):  # not `None in`: that calls Tensor.__eq__
            self._grads = grads
            return self._network_params
        named = [(n, p) for n, p in self._network_params if p.grad is not None]
        self._grads = [p.grad for _, p in named]
        return named

    def _add_gradient_stats(self, named: list[tuple[str, torch.Tensor]]) -> None:
        if named is not self._grad_list:  # usually the same cached list, step after step
            key = tuple(n for n, _ in named)
            if key != self._grad_key:
                self._grad_key = key
                sizes = [p.numel() for _, p in named]
                self._grad_stats, self._update = GradientStats(sizes), UpdateRatio(sizes)
                self._grad_tags = (tuple(tags.grad(n, stat) for n in key for stat in tags.GRAD_STATS)
                                   + (tags.GLOBAL_NORM,))
                self._update_tags = tuple(tags.update(n) for n in key)
            self._grad_list = named
            self._params = [p for _, p in named]
        # A copy, read under no_grad (no detach needed), or the one the last step carried over.
        self._kept = self._update.before(self._params, reuse=self._carry_step == self._step)
        # Per-parameter rows, then the global norm. Weights the CPU kernels took (kept in numpy)
        # vouch for their gradients' dtype, device and size: autograd keeps them those of the weight.
        self._pending.append(self._grad_stats.pending(self._grads, checked=isinstance(self._kept, np.ndarray)))
        self._pending_tags.append(self._grad_tags)

    def _add_activation_stats(self) -> None:
        calls = self._calls
        if list(map(len, calls)).count(1) == len(calls):  # every layer called once (C loops: ~49 layers)
            present, outputs = self._every_layer, list(map(_FIRST, calls))
        else:
            present = tuple(i for i, made in enumerate(calls) if made)
            # One call: its output as it is; several: concatenated (`unit_view`).
            outputs = [made[0] if len(made) == 1 else unit_view(made) for made in calls if made]
        list(map(list.clear, calls))
        key = (present, tuple(map(_SHAPE, outputs)))
        if key == self._last_act[0]:  # the last step's layers and shapes: no hashing of ~49 shapes
            entry = self._last_act[1]
        else:
            entry = self._act_stats.get(key)
            if entry is None:
                act_tags = tuple(tags.act(self._layers[i][0], stat) for i in present for stat in tags.ACT_STATS)
                entry = self._act_stats[key] = (ActivationStats([tuple(o.shape) for o in outputs]), act_tags,
                                                list(present))
            self._last_act = key, entry
        stats, act_tags, present = entry
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
        self._pending.append((values, finish))
        self._pending_tags.append(act_tags)
        self._epoch_layers, self._epoch_stats = present, stats

    def _add_epoch_dead_fraction(self) -> None:
        fired, self._fired_epoch = self._fired_epoch, None
        if self._epoch_stats is None:  # resumed on an epoch's last batch, nothing logged since
            return
        never_fired = self._epoch_stats.epoch_pending(fired)
        self._pending.append((never_fired.numpy() if isinstance(never_fired, torch.Tensor) and never_fired.is_cpu
                              else never_fired, None))
        key = tuple(self._epoch_layers)
        epoch_tags = self._epoch_tags.get(key)
        if epoch_tags is None:  # one tuple object per set of layers: the names caches key by identity
            epoch_tags = self._epoch_tags[key] = tuple(tags.act(self._layers[i][0], tags.ACT_EPOCH) for i in key)
        self._pending_tags.append(epoch_tags)

    def _step_names(self) -> tuple[str, ...]:
        """This step's tags, one tuple object per combination (the recorder caches by it)."""
        # Keyed by the groups' identities (hashing ~700 strings a step costs more): the cache
        # keeps the groups alive, so an id is never reused for another group.
        key = tuple(map(id, self._pending_tags))
        cached = self._names_cache.get(key)
        if cached is None:
            if len(self._names_cache) > 64:  # a caller making new tuples each step: do not grow
                self._names_cache.clear()
            groups = tuple(self._pending_tags)
            cached = self._names_cache[key] = tuple(n for group in groups for n in group), groups
        return cached[0]

    def _transfer(self) -> np.ndarray:
        """Everything pending as one float64 vector, finished on the host; clears it. Tensors
        come over in one transfer (the step's one device-to-host synchronisation); what the CPU
        kernels made is there already (numpy arrays)."""
        pending, self._pending, self._pending_tags = self._pending, [], []
        if not pending:
            return np.empty(0)
        tensors = [values.reshape(-1) for values, _ in pending if isinstance(values, torch.Tensor)]
        if not tensors:  # all on the host already (the CPU kernels)
            return np.concatenate([values if finish is None else finish(values) for values, finish in pending])
        host = (torch.cat(tensors) if len(tensors) > 1 else tensors[0]).cpu().numpy()
        parts, start = [], 0
        for values, finish in pending:
            if isinstance(values, torch.Tensor):
                end = start + values.numel()
                values, start = host[start:end], end
            parts.append(values if finish is None else finish(values))
        return np.concatenate(parts).astype(np.float64, copy=False)  # a new array: never a view of a buffer

    def _check_finite(self, trainer, step: int, grad_values: np.ndarray) -> None:
        # A finite global norm (last) means every gradient is finite: one number, not a column.
        # (An infinite one may still come from finite float64 gradients above ~1e154: count.)
        if math.isfinite(grad_values[-1]):
            return
        counts = grad_values[_NONFINITE:-1:len(tags.GRAD_STATS)]  # the rows' nonfinite column
        if not counts.any():
            return
        bad = [name for (name, _), count in zip(self._named, counts, strict=True) if count > 0]
        reason = f"non-finite gradient at step {step} in {', '.join(bad)}"
        if self.on_nonfinite == "stop":
            # Drop the gradients so this step's update leaves the weights (and last.ckpt) finite.
            for param in network_of(trainer.lightning_module).parameters():
                param.grad = None
            self.recorder.diverge(step, reason, trainer)
            return
        self.recorder.diverge(step, reason, trainer, stop=False)
        new = [name for name in bad if name not in self._warned]
        if new:
            self._warned.update(new)
            log.warning("non-finite gradient at step %d in %s", step, ", ".join(new))
