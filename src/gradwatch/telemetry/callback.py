"""The telemetry callback: gradient statistics and dead-ReLU rates, every N steps.

"What" lives in `gradwatch.telemetry.stats`; this adapter decides "when" and hands the numbers to the
`StepRecorder`, which writes them with the step's loss as one event.
"""

import logging

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from gradwatch.config.errors import ConfigError, check_int
from gradwatch.telemetry import tags
from gradwatch.telemetry.recorder import StepRecorder
from gradwatch.telemetry.stats import ActivationStats, GradientStats

log = logging.getLogger(__name__)

ON_NONFINITE = ("warn", "stop")
DEAD_UNIT_MODULES = (nn.ReLU, nn.ReLU6)
_NONFINITE = tags.GRAD_STATS.index("nonfinite")


def relu_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose units can die: `[("1", ReLU())]` for Linear-ReLU-Linear."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DEAD_UNIT_MODULES)]


class GradientTelemetry(pl.Callback):
    """Logs `grad/<param>/<stat>`, `grad/global_norm` and `act/<layer>/...` every `every_n_steps`.

    Gradients are read in `on_before_optimizer_step`: the gradients of this step's loss, before
    the update. Activations come from forward hooks on ReLU modules; when logging every N > 1
    steps, the hooks exist only on the steps that log, so the other steps do no work at all.

    Example::

        recorder = StepRecorder(run_dir, logger)
        Trainer(callbacks=[GradientTelemetry(recorder, every_n_steps=10), recorder])

    Args:
        recorder: where the numbers go.
        every_n_steps: log on steps 0, n, 2n, ...
        activations: record dead/zero fractions of ReLU layers.
        on_nonfinite: `warn` (log it, warn once per parameter) or `stop` (end the run as diverged).
        histograms_every_n_steps: also write gradient histograms this often (0: never).
    """

    def __init__(self, recorder: StepRecorder, every_n_steps: int = 1, activations: bool = True,
                 on_nonfinite: str = "warn", histograms_every_n_steps: int = 0):
        check_int("every_n_steps", every_n_steps, minimum=1)
        check_int("histograms_every_n_steps", histograms_every_n_steps, minimum=0, allowed="an integer >= 0 (0: never)")
        if on_nonfinite not in ON_NONFINITE:
            raise ConfigError("on_nonfinite", on_nonfinite, "one of " + ", ".join(ON_NONFINITE))
        self.recorder = recorder
        self.every_n_steps = every_n_steps
        self.activations = activations
        self.on_nonfinite = on_nonfinite
        self.histograms_every_n_steps = histograms_every_n_steps
        self._warned: set[str] = set()
        self._active = False
        self._hooks: list = []
        self._outputs: list[torch.Tensor] = []
        self._layers: list[tuple[str, nn.Module]] = []
        self._grad_key: tuple[str, ...] | None = None
        self._grad_stats: GradientStats | None = None
        self._grad_tags: tuple[str, ...] = ()
        self._act_stats: ActivationStats | None = None
        self._act_tags: tuple[str, ...] = ()
        self._epoch_tags: tuple[str, ...] = ()
        self._fired_epoch: torch.Tensor | None = None

    @staticmethod
    def _network(pl_module: pl.LightningModule) -> nn.Module:
        return getattr(pl_module, "model", pl_module)

    # -- when ----------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        self._layers = relu_layers(self._network(pl_module)) if self.activations else []
        self._act_tags = tuple(tags.act(name, stat) for name, _ in self._layers for stat in tags.ACT_STATS)
        self._epoch_tags = tuple(tags.act(name, tags.ACT_EPOCH) for name, _ in self._layers)
        if self.every_n_steps == 1:
            self._add_hooks()  # every step logs: keep them for the whole fit
        # Written on every fit, resumes included: TensorBoard keeps the latest layout.
        params = [n for n, p in self._network(pl_module).named_parameters() if p.requires_grad]
        self.recorder.writer.add_custom_scalars(tags.custom_scalars_layout(params, [n for n, _ in self._layers]))

    def _add_hooks(self) -> None:
        self._hooks = [m.register_forward_hook(self._keep_output) for _, m in self._layers]

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _keep_output(self, module, inputs, output) -> None:
        if module.training:
            self._outputs.append(output)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._active = trainer.global_step % self.every_n_steps == 0
        self._outputs = []
        if self._active and self.every_n_steps > 1:
            self._add_hooks()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._active:
            return
        self._active = False
        if self.every_n_steps > 1:
            self._remove_hooks()
        step = trainer.global_step
        named = [(n, p.grad) for n, p in self._network(pl_module).named_parameters() if p.grad is not None]
        if named:
            grad_values = self._gradient_values(named)
            self.recorder.add(self._grad_tags, grad_values)
            self._check_finite(trainer, step, named, grad_values)
        if self._layers and len(self._outputs) == len(self._layers):
            self.recorder.add(self._act_tags, self._activation_values())
        self._outputs = []
        if self.histograms_every_n_steps and step % self.histograms_every_n_steps == 0:
            for name, grad in named:
                self.recorder.writer.add_histogram(f"grad/{name}", grad.detach(), step)

    def state_dict(self) -> dict:
        # The units that fired so far this epoch, so a mid-epoch resume counts the whole epoch.
        return {"fired_epoch": self._fired_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self._fired_epoch = state_dict.get("fired_epoch")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._fired_epoch is None or self._act_stats is None:
            return
        if batch_idx + 1 >= trainer.num_training_batches:
            dead = self._act_stats.epoch_dead_fraction(self._fired_epoch).numpy()
            self.recorder.add(self._epoch_tags, dead)
            self._fired_epoch = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._remove_hooks()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._remove_hooks()

    # -- what -----------------------------------------------------------------------------------
    def _gradient_values(self, named: list[tuple[str, torch.Tensor]]) -> np.ndarray:
        key = tuple(n for n, _ in named)
        if key != self._grad_key:
            self._grad_key = key
            self._grad_stats = GradientStats([g.numel() for _, g in named])
            self._grad_tags = tuple(tags.grad(n, stat) for n in key for stat in tags.GRAD_STATS) + (tags.GLOBAL_NORM,)
        table = self._grad_stats([g for _, g in named])
        # Per-parameter rows, then the global norm: one transfer to the host.
        return torch.cat([table[:-1].reshape(-1), table[-1:, tags.GRAD_STATS.index("norm")]]).numpy()

    def _activation_values(self) -> np.ndarray:
        if self._act_stats is None:
            self._act_stats = ActivationStats([tuple(o.shape) for o in self._outputs])
        rows, fired = self._act_stats(self._outputs)
        if self._fired_epoch is None or self._fired_epoch.shape != fired.shape:
            self._fired_epoch = fired  # a new epoch, or a checkpoint from another model
        else:
            self._fired_epoch = self._fired_epoch | fired
        return rows.reshape(-1).numpy()

    def _check_finite(self, trainer, step: int, named, values: np.ndarray) -> None:
        counts = values[:-1].reshape(len(named), len(tags.GRAD_STATS))[:, _NONFINITE]
        if not counts.any():
            return
        bad = [name for (name, _), count in zip(named, counts, strict=True) if count > 0]
        reason = f"non-finite gradient at step {step} in {', '.join(bad)}"
        if self.on_nonfinite == "stop":
            # Drop the gradients so this step's update leaves the weights (and last.ckpt) finite.
            for param in self._network(trainer.lightning_module).parameters():
                param.grad = None
            self.recorder.diverge(step, reason, trainer)
            return
        self.recorder.diverge(step, reason, trainer, stop=False)
        new = [name for name in bad if name not in self._warned]
        if new:
            self._warned.update(new)
            log.warning("non-finite gradient at step %d in %s", step, ", ".join(new))
