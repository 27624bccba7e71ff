"""The telemetry callback: gradient statistics and dead-ReLU rates, every N steps.

"What" lives in `gradwatch.stats`; this adapter decides "when" and hands the numbers to the
`StepRecorder`, which writes them with the step's loss as one event.
"""

import logging

import lightning.pytorch as pl
import torch
from torch import nn

from gradwatch import tags
from gradwatch.errors import ConfigError
from gradwatch.recorder import StepRecorder
from gradwatch.stats import SegmentReducer, activation_stats, epoch_dead_fraction, gradient_stats

log = logging.getLogger(__name__)

ON_NONFINITE = ("warn", "stop")
DEAD_UNIT_MODULES = (nn.ReLU, nn.ReLU6)


def relu_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose units can die: `[("1", ReLU())]` for Linear-ReLU-Linear."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DEAD_UNIT_MODULES)]


class GradientTelemetry(pl.Callback):
    """Logs `grad/<param>/<stat>`, `grad/global_norm` and `act/<layer>/...` every `every_n_steps`.

    Gradients are read in `on_before_optimizer_step`: the gradients of this step's loss, before
    the update. Activations come from forward hooks that exist only on the steps that log.

    Example::

        recorder = StepRecorder(run_dir, writer)
        Trainer(callbacks=[GradientTelemetry(recorder, every_n_steps=10), recorder])

    Args:
        recorder: where the numbers go.
        every_n_steps: log on steps 0, n, 2n, ...; on other steps nothing is computed.
        activations: record dead/zero fractions of ReLU layers.
        on_nonfinite: `warn` (log it, warn once per parameter) or `stop` (end the run as diverged).
        histograms_every_n_steps: also write gradient histograms this often (0: never).
    """

    def __init__(self, recorder: StepRecorder, every_n_steps: int = 1, activations: bool = True,
                 on_nonfinite: str = "warn", histograms_every_n_steps: int = 0):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ConfigError("every_n_steps", every_n_steps, "an integer >= 1")
        if on_nonfinite not in ON_NONFINITE:
            raise ConfigError("on_nonfinite", on_nonfinite, "one of " + ", ".join(ON_NONFINITE))
        if isinstance(histograms_every_n_steps, bool) or not isinstance(histograms_every_n_steps, int) \
                or histograms_every_n_steps < 0:
            raise ConfigError("histograms_every_n_steps", histograms_every_n_steps, "an integer >= 0 (0: never)")
        self.recorder = recorder
        self.every_n_steps = every_n_steps
        self.activations = activations
        self.on_nonfinite = on_nonfinite
        self.histograms_every_n_steps = histograms_every_n_steps
        self._warned: set[str] = set()
        self._active = False
        self._hooks: list = []
        self._outputs: list[torch.Tensor] = []
        self._grad_cache: tuple[tuple[str, ...], SegmentReducer, list[str]] | None = None
        self._layers: list[tuple[str, nn.Module]] = []
        self._act_reducer: SegmentReducer | None = None
        self._act_tags: list[str] = []
        self._fired_epoch: torch.Tensor | None = None

    @staticmethod
    def _network(pl_module: pl.LightningModule) -> nn.Module:
        return getattr(pl_module, "model", pl_module)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._layers = relu_layers(self._network(pl_module)) if self.activations else []
        self._act_tags = [tags.act(name, stat) for name, _ in self._layers for stat in tags.ACT_STATS]

    # -- when ----------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._active = trainer.global_step % self.every_n_steps == 0
        if self._active and self._layers:
            self._outputs = []
            self._hooks = [m.register_forward_hook(self._keep_output) for _, m in self._layers]

    def _keep_output(self, module, inputs, output) -> None:
        if module.training:
            self._outputs.append(output)

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._active:
            return
        self._active = False
        self._remove_hooks()
        step = trainer.global_step
        named = [(n, p.grad) for n, p in self._network(pl_module).named_parameters() if p.grad is not None]
        names, values = self._gradient_values(named)
        if len(self._outputs) == len(self._layers) and self._layers:
            rows, fired = activation_stats(self._outputs, self._activation_reducer())
            self._fired_epoch = fired if self._fired_epoch is None else self._fired_epoch | fired
            names += self._act_tags
            values += rows.reshape(-1).tolist()
        self._outputs = []
        self.recorder.add(names, values)
        if self.histograms_every_n_steps and step % self.histograms_every_n_steps == 0:
            for name, grad in named:
                self.recorder.writer.add_histogram(f"grad/{name}", grad.detach(), step)
        self._check_finite(trainer, step, names, values)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last_batch = batch_idx + 1 >= trainer.num_training_batches
        if last_batch and self._fired_epoch is not None:
            dead = epoch_dead_fraction(self._fired_epoch, self._activation_reducer()).tolist()
            self.recorder.add([tags.act(name, tags.ACT_EPOCH) for name, _ in self._layers], dead)
            self._fired_epoch = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._remove_hooks()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._remove_hooks()

    # -- what -----------------------------------------------------------------------------------
    def _gradient_values(self, named: list[tuple[str, torch.Tensor]]) -> tuple[list[str], list[float]]:
        key = tuple(n for n, _ in named)
        if self._grad_cache is None or self._grad_cache[0] != key:
            reducer = SegmentReducer([g.numel() for _, g in named])
            names = [tags.grad(n, stat) for n in key for stat in tags.GRAD_STATS] + [tags.GLOBAL_NORM]
            self._grad_cache = (key, reducer, names)
        _, reducer, names = self._grad_cache
        if not named:
            return [], []
        table = gradient_stats([g for _, g in named], reducer)
        per_param = table[:-1].reshape(-1)
        global_norm = table[-1, tags.GRAD_STATS.index("norm")].reshape(1)
        return list(names), torch.cat([per_param, global_norm]).tolist()

    def _activation_reducer(self) -> SegmentReducer:
        if self._act_reducer is None:
            self._act_reducer = SegmentReducer([o.reshape(o.shape[0], -1).shape[1] for o in self._outputs])
        return self._act_reducer

    def _check_finite(self, trainer, step: int, names: list[str], values: list[float]) -> None:
        suffix = "/" + "nonfinite"
        bad = [n[len("grad/"): -len(suffix)] for n, v in zip(names, values, strict=True)
               if n.endswith(suffix) and v > 0]
        if not bad:
            return
        if self.on_nonfinite == "stop":
            self.recorder.diverge(step, f"non-finite gradient at step {step} in {', '.join(bad)}", trainer)
            return
        for name in bad:
            if name not in self._warned:
                self._warned.add(name)
                log.warning("non-finite gradient in %s at step %d", name, step)
