"""GradientTelemetry under what Lightning allows: gradient accumulation, manual optimization with
two optimizers, in-place ops after a ReLU, activations it does not count, resume into the same
logger folder, non-finite gradients, several instances, release after fit. Each run goes through a
real Trainer, is read back from TensorBoard's files (EventAccumulator) and compared with torch's
own numbers, recomputed in float64 from gradients and weights captured independently."""

import copy
import gc
import logging
import math
import weakref

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from gradwatch import GradientTelemetry

QUIET = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False}


def read_events(log_dir) -> dict[str, dict[int, list[float]]]:
    """Every scalar by tag, then step: a list of the values TensorBoard keeps for it (one, unless
    a step was written twice)."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, dict[int, list[float]]] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            out.setdefault(tag, {}).setdefault(event.step, []).append(event.value)
    return out


def once(scalars: dict[str, dict[int, list[float]]]) -> dict[str, dict[int, float]]:
    """The same, asserting every step of every tag was written once."""
    for tag, steps in scalars.items():
        assert all(len(values) == 1 for values in steps.values()), (tag, {s: v for s, v in steps.items()
                                                                          if len(v) > 1})
    return {tag: {step: values[0] for step, values in steps.items()} for tag, steps in scalars.items()}


def grad_stats64(grad: torch.Tensor) -> dict[str, float]:
    g = grad.detach().double()
    return {"mean": g.mean().item(), "std": g.std().item() if g.numel() > 1 else 0.0,
            "zero_fraction": (g == 0).double().mean().item(), "norm": g.norm().item(),
            "abs_max": g.abs().max().item(), "nonfinite": float((~torch.isfinite(g)).sum().item())}


def assert_grad_tags(scalars: dict, step: int, grads: dict[str, torch.Tensor]) -> None:
    for name, grad in grads.items():
        for stat, expected in grad_stats64(grad).items():
            actual = scalars[f"grad/{name}/{stat}"][step]
            assert actual == pytest.approx(expected, rel=2e-6, abs=1e-9), (step, name, stat)
    total = math.sqrt(sum(g.double().pow(2).sum().item() for g in grads.values()))
    assert scalars["grad/global_norm"][step] == pytest.approx(total, rel=2e-6)


class Capture(pl.Callback):
    """torch's own gradients (float64 copies) and weights before and after each optimizer step,
    by global step: the independent record the logged numbers are compared with."""

    def __init__(self, network: nn.Module):
        self.network = network
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self._open: list[tuple[int, list[str]]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        named = [(n, p) for n, p in self.network.named_parameters() if id(p) in owned and p.grad is not None]
        step = trainer.global_step
        self.grads[step] = {n: p.grad.detach().double().clone() for n, p in named}
        self.before[step] = {n: p.detach().double().clone() for n, p in named}
        optimizer.register_step_post_hook(self._after) if not hasattr(optimizer, "_captured") else None
        optimizer._captured = True
        self._open.append((step, [n for n, _ in named]))

    def _after(self, optimizer, args, kwargs):
        step, names = self._open.pop()
        params = dict(self.network.named_parameters())
        self.after[step] = {n: params[n].detach().double().clone() for n in names}

    def ratio(self, step: int, name: str) -> float:
        before, after = self.before[step][name], self.after[step][name]
        return ((after - before).norm() / before.norm()).item()


# -- gradient accumulation --------------------------------------------------------------------
class Net(pl.LightningModule):
    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.l1, self.relu, self.l2 = nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)
        self.lr = lr

    def forward(self, x):
        return self.l2(self.relu(self.l1(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.5)


def micro_batches(count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, generator=generator), torch.randn(4, 1, generator=generator)) for _ in range(count)]


def test_accumulated_steps_are_logged_at_their_optimizer_step(tmp_path):
    torch.manual_seed(0)
    module = Net()
    with torch.no_grad():
        module.l1.bias[:6] = -1.0  # some units fire on some micro-batches only
    replay = copy.deepcopy(module)
    batches = micro_batches(8)
    capture = Capture(module)
    logger = TensorBoardLogger(str(tmp_path), name="acc")
    trainer = pl.Trainer(max_steps=2, accumulate_grad_batches=4, logger=logger, enable_checkpointing=False,
                         callbacks=[GradientTelemetry(), capture], **QUIET)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    scalars = once(read_events(logger.log_dir))
    assert sorted(scalars["train/loss"]) == sorted(scalars["grad/l1.weight/norm"]) == [0, 1]
    for step in (0, 1):
        assert_grad_tags(scalars, step, capture.grads[step])
        for name in capture.grads[step]:
            assert scalars[f"update/{name}/ratio"][step] == pytest.approx(capture.ratio(step, name), rel=1e-5)
    # Step 0 by hand: its loss is the mean of its four micro-batches', its units dead only if they
    # fired on none of them.
    with torch.no_grad():
        window = batches[:4]
        losses = [nn.functional.mse_loss(replay(x), y).item() for x, y in window]
        h = torch.cat([replay.relu(replay.l1(x)) for x, _ in window]).double()
    assert scalars["train/loss"][0] == pytest.approx(sum(losses) / 4, rel=1e-6)
    assert scalars["act/relu/dead_fraction"][0] == ((h > 0).sum(0) == 0).double().mean().item()
    assert scalars["act/relu/zero_fraction"][0] == pytest.approx((h == 0).double().mean().item(), abs=1e-7)
    one_batch_dead = ((h[-4:] > 0).sum(0) == 0).double().mean().item()
    assert one_batch_dead != scalars["act/relu/dead_fraction"][0]  # the last micro-batch alone differs


def test_a_thousand_accumulated_steps_every_third_logged(tmp_path):
    torch.manual_seed(1)
    module = Net(lr=0.01)
    capture = Capture(module)
    logger = TensorBoardLogger(str(tmp_path), name="long")
    telemetry = GradientTelemetry(every_n_steps=3)
    trainer = pl.Trainer(max_steps=1000, accumulate_grad_batches=4, logger=logger, enable_checkpointing=False,
                         callbacks=[telemetry, capture], **QUIET)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(micro_batches(10), batch_size=None))
    assert trainer.global_step == 1000
    assert "forward" not in module.relu.__dict__  # every tap removed
    scalars = once(read_events(logger.log_dir))
    logged = list(range(0, 1000, 3))
    assert sorted(scalars["grad/l1.weight/norm"]) == sorted(scalars["act/relu/dead_fraction"]) == logged
    assert sorted(scalars["train/loss"]) == list(range(1000))
    for step in logged:
        norm = capture.grads[step]["l1.weight"].norm().item()
        assert scalars["grad/l1.weight/norm"][step] == pytest.approx(norm, rel=2e-6), step
        assert scalars["update/l2.weight/ratio"][step] == pytest.approx(capture.ratio(step, "l2.weight"), rel=1e-4)


# -- manual optimization, two optimizers ------------------------------------------------------
class Gan(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 3))
        self.critic = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1))
        self.losses: list[tuple[int, float]] = []

    def training_step(self, batch, batch_idx):
        opt_g, opt_c = self.optimizers()
        noise, real = batch
        loss_g = -self.critic(self.generator(noise)).mean()  # reaches the critic's parameters too
        self.losses.append((self.global_step, loss_g.item()))
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        loss_c = self.critic(self.generator(noise).detach()).mean() - self.critic(real).mean()
        self.losses.append((self.global_step, loss_c.item()))
        opt_c.zero_grad()
        self.manual_backward(loss_c)
        opt_c.step()

    def configure_optimizers(self):
        return (torch.optim.SGD(self.generator.parameters(), lr=0.05),
                torch.optim.Adam(self.critic.parameters(), lr=0.01))


def fit_two_optimizers(module: Gan, tmp_path, count: int) -> dict[str, dict[int, float]]:
    """Fit `module` for `count` optimizer steps (two a batch) and check that each step logged the
    gradients and update ratios of its own optimizer's parameters, as torch computed them."""
    capture = Capture(module)
    logger = TensorBoardLogger(str(tmp_path), name="gan")
    trainer = pl.Trainer(max_steps=count, logger=logger, enable_checkpointing=False,
                         callbacks=[GradientTelemetry(), capture], **QUIET)
    data = [(torch.randn(8, 2), torch.randn(8, 3)) for _ in range(count // 2)]
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    scalars = once(read_events(logger.log_dir))
    for step in range(count):
        own = "generator" if step % 2 == 0 else "critic"
        other = "critic" if own == "generator" else "generator"
        assert capture.grads[step] and all(name.startswith(own) for name in capture.grads[step])
        assert_grad_tags(scalars, step, capture.grads[step])
        for name in capture.grads[step]:
            assert scalars[f"update/{name}/ratio"][step] == pytest.approx(capture.ratio(step, name), rel=1e-5)
        assert not any(step in steps for tag, steps in scalars.items() if tag.startswith(f"grad/{other}."))
    return scalars


def test_manual_optimization_logs_each_optimizer_step_with_its_own_parameters(tmp_path):
    torch.manual_seed(2)
    module = Gan()
    scalars = fit_two_optimizers(module, tmp_path, count=6)
    assert sorted(scalars["train/loss"]) == list(range(6))
    for step, loss in module.losses:
        assert scalars["train/loss"][step] == pytest.approx(loss, rel=1e-6)


class BackwardBothThenStep(Gan):
    """Both losses backward first, then both optimizers step: the second step's numbers are its own."""

    def training_step(self, batch, batch_idx):
        opt_g, opt_c = self.optimizers()
        noise, real = batch
        opt_g.zero_grad()
        opt_c.zero_grad()
        loss_g = self.generator(noise).pow(2).mean()  # the generator's parameters only
        loss_c = self.critic(real).pow(2).mean()  # the critic's only
        self.manual_backward(loss_g)
        self.manual_backward(loss_c)
        opt_g.step()
        opt_c.step()


def test_manual_optimization_two_steps_after_two_backwards_are_each_at_their_own_step(tmp_path):
    torch.manual_seed(3)
    fit_two_optimizers(BackwardBothThenStep(), tmp_path, count=4)


# -- activations: in place after the tap, and what is not counted -----------------------------
class InPlace(pl.LightningModule):
    """A frozen first layer (so autograd keeps nothing of its ReLU's output) whose ReLU output is
    then shifted in place; a second, untouched ReLU layer."""

    def __init__(self):
        super().__init__()
        self.frozen, self.first = nn.Linear(3, 4), nn.ReLU()
        self.frozen.requires_grad_(False)
        self.hidden, self.second, self.head = nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1)

    def forward(self, x):
        h = self.first(self.frozen(x))
        h.add_(1.0)
        return self.head(self.second(self.hidden(h)))

    def training_step(self, batch, batch_idx):
        return self(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.01)


def test_an_output_changed_in_place_after_the_tap_is_left_out_and_said_once(tmp_path, caplog):
    torch.manual_seed(3)
    module = InPlace()
    replay = copy.deepcopy(module)
    logger = TensorBoardLogger(str(tmp_path), name="inplace")
    x = torch.randn(16, 3)
    trainer = pl.Trainer(max_steps=3, logger=logger, enable_checkpointing=False, callbacks=[GradientTelemetry()],
                         **QUIET)
    with caplog.at_level(logging.WARNING):
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([x], batch_size=None))
    scalars = once(read_events(logger.log_dir))
    assert "act/first/dead_fraction" not in scalars
    with torch.no_grad():
        h = replay.second(replay.hidden(replay.first(replay.frozen(x)) + 1.0)).double()
    assert scalars["act/second/dead_fraction"][0] == pytest.approx(((h > 0).sum(0) == 0).double().mean().item(),
                                                                   abs=1e-7)  # float32 in TensorBoard
    lines = [r.getMessage() for r in caplog.records if "modified in place" in r.getMessage()]
    assert len(lines) == 1 and "ReLU layer first " in lines[0]


class Mixed(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.a, self.gelu, self.b, self.leaky = nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 4), nn.LeakyReLU()
        self.c, self.relu, self.head = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1)

    def forward(self, x):
        h = nn.functional.relu(self.leaky(self.b(self.gelu(self.a(x)))))
        return self.head(self.relu(self.c(h)))

    def training_step(self, batch, batch_idx):
        return self(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_activations_it_does_not_count_are_named_in_one_line_at_fit_start(tmp_path, caplog):
    logger = TensorBoardLogger(str(tmp_path), name="mixed")
    trainer = pl.Trainer(max_steps=2, logger=logger, enable_checkpointing=False, callbacks=[GradientTelemetry()],
                         **QUIET)
    with caplog.at_level(logging.WARNING):
        trainer.fit(Mixed(), train_dataloaders=torch.utils.data.DataLoader([torch.randn(8, 3)], batch_size=None))
    lines = [r.getMessage() for r in caplog.records if "not watched" in r.getMessage()]
    assert len(lines) == 1
    assert "GELU (gelu)" in lines[0] and "LeakyReLU (leaky)" in lines[0] and "F.relu" in lines[0]
    scalars = once(read_events(logger.log_dir))
    assert {t.rsplit("/", 1)[0] for t in scalars if t.startswith("act/")} == {"act/relu"}


# -- resume, several instances, non-finite gradients, release --------------------------------
def test_resume_from_an_older_checkpoint_into_the_same_folder_writes_each_step_once(tmp_path):
    def fit(steps, ckpt_path=None, version="run"):
        torch.manual_seed(4)
        module = Net()
        logger = TensorBoardLogger(str(tmp_path), name="resume", version=version)
        every = ModelCheckpoint(dirpath=tmp_path / f"ckpt-{version}", every_n_train_steps=1, save_top_k=-1,
                                filename="{step}")
        trainer = pl.Trainer(max_steps=steps, logger=logger, callbacks=[GradientTelemetry(), every], **QUIET)
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(micro_batches(5), batch_size=None),
                    ckpt_path=ckpt_path)
        return logger.log_dir

    straight = once(read_events(fit(12, version="straight")))
    fit(12)
    log_dir = fit(12, ckpt_path=tmp_path / "ckpt-run" / "step=5.ckpt")  # an older one, mid-epoch
    resumed = once(read_events(log_dir))
    assert sorted(resumed["train/loss"]) == list(range(12))
    for tag in ("train/loss", "grad/l1.weight/norm", "act/relu/dead_fraction", "update/l2.bias/ratio"):
        assert resumed[tag] == pytest.approx(straight[tag], rel=1e-6), tag


def test_two_instances_are_refused_in_one_line_that_says_how_to_combine(tmp_path):
    trainer = pl.Trainer(max_steps=1, logger=TensorBoardLogger(str(tmp_path)), enable_checkpointing=False,
                         callbacks=[GradientTelemetry(), GradientTelemetry(every_n_steps=100)], **QUIET)
    with pytest.raises(MisconfigurationException) as refused:
        trainer.fit(Net(), train_dataloaders=torch.utils.data.DataLoader(micro_batches(1), batch_size=None))
    message = str(refused.value)
    assert "\n" not in message and "histograms_every_n_steps" in message and "2 instances" in message


def test_a_sharding_strategy_is_refused_in_one_line_at_setup():
    """FSDP needs a GPU to be built; the check only looks at the Trainer's strategy (as Lightning's
    own callbacks do in `setup`), so a strategy object not set up is enough."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    telemetry = GradientTelemetry()
    trainer = SimpleNamespace(callbacks=[telemetry], strategy=object.__new__(FSDPStrategy), loggers=[])
    with pytest.raises(MisconfigurationException) as refused:
        telemetry.setup(trainer, None, "fit")
    assert "\n" not in str(refused.value) and "FSDPStrategy shards parameters" in str(refused.value)


class ScaledManual(Net):
    """Manual optimization under 16-mixed: Lightning hands `on_before_backward` the scaled loss."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append(loss.item())
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_manual_optimization_under_16_mixed_logs_the_unscaled_loss(tmp_path):
    torch.manual_seed(8)
    module = ScaledManual()
    logger = TensorBoardLogger(str(tmp_path), name="scaled")
    from lightning.pytorch.plugins import MixedPrecision

    scaled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))  # as on a GPU
    trainer = pl.Trainer(max_steps=3, plugins=[scaled], logger=logger, enable_checkpointing=False,
                         callbacks=[GradientTelemetry()], **QUIET)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(micro_batches(3), batch_size=None))
    scalars = once(read_events(logger.log_dir))
    assert trainer.precision_plugin.scaler.get_scale() >= 2.0**15  # what backward was handed, scaled
    for step, loss in enumerate(module.losses):
        assert scalars["train/loss"][step] == pytest.approx(loss, rel=1e-6)


class Poisoned(Net):
    """l1.weight's gradient turns NaN at step 2 (the loss stays finite there)."""

    def on_fit_start(self):
        self.l1.weight.register_hook(lambda g: torch.full_like(g, math.nan) if self.global_step == 2 else g)


@pytest.mark.parametrize("policy", ["warn", "stop"])
def test_a_nonfinite_gradient_is_said_in_one_line_and_stop_keeps_the_weights_finite(tmp_path, caplog, policy):
    torch.manual_seed(5)
    module = Poisoned()
    logger = TensorBoardLogger(str(tmp_path), name=policy)
    telemetry = GradientTelemetry(on_nonfinite=policy)
    last = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    trainer = pl.Trainer(max_steps=5, logger=logger, callbacks=[telemetry, last], **QUIET)
    with caplog.at_level(logging.WARNING):
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(micro_batches(1), batch_size=None))
    scalars = once(read_events(logger.log_dir))
    lines = [r.getMessage() for r in caplog.records if "non-finite gradient" in r.getMessage()]
    assert lines and "at step 2 in l1.weight (24 values)" in lines[0] and f"on_nonfinite={policy}" in lines[0]
    assert scalars["grad/l1.weight/nonfinite"][2] == 24
    assert telemetry.divergence["step"] == 2 and "l1.weight" in telemetry.divergence["reason"]  # kept after fit
    if policy == "warn":
        assert trainer.global_step == 5 and sorted(scalars["train/loss"]) == list(range(5))
        # The NaN update made every later loss NaN: said once, not at every step.
        assert len([r for r in caplog.records if "non-finite loss" in r.getMessage()]) == 1
    else:
        assert trainer.global_step == 3 and sorted(scalars["train/loss"]) == [0, 1, 2]
        assert all(torch.isfinite(p).all() for p in module.parameters())
        saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in saved.values())
        assert "update skipped and training stopped" in lines[0]


def test_nothing_of_the_model_is_held_after_fit(tmp_path):
    torch.manual_seed(6)
    module = Net()
    telemetry = GradientTelemetry()
    held = []

    class Look(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            entry = next(iter(telemetry._param_sets.values()))
            held.extend(weakref.ref(obj) for obj in (entry, entry.grad_stats, entry.update,
                                                     telemetry._last_act[1][0]))

    trainer = pl.Trainer(max_steps=3, logger=TensorBoardLogger(str(tmp_path)), enable_checkpointing=False,
                         callbacks=[telemetry, Look()], **QUIET)
    gc.disable()
    try:
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(micro_batches(2), batch_size=None))
        assert len(held) == 4 and [ref() for ref in held] == [None] * 4  # freed without the cycle collector
    finally:
        gc.enable()
    assert "forward" not in module.relu.__dict__ and telemetry.recorder is None


def test_update_ratio_off_keeps_no_copy_of_the_weights(tmp_path):
    torch.manual_seed(7)
    module = Net()
    capture = Capture(module)
    logger = TensorBoardLogger(str(tmp_path), name="noratio")
    telemetry = GradientTelemetry(update_ratio=False)
    kept = []

    class Look(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            kept.extend(entry.update for entry in telemetry._param_sets.values())

    trainer = pl.Trainer(max_steps=2, logger=logger, enable_checkpointing=False,
                         callbacks=[telemetry, capture, Look()], **QUIET)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(micro_batches(2), batch_size=None))
    scalars = once(read_events(logger.log_dir))
    assert kept == [None] and not any(tag.startswith("update/") for tag in scalars)
    assert_grad_tags(scalars, 1, capture.grads[1])
