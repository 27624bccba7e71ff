"""Statistics at the edges: any magnitude, half precision, any device, any call order."""

import math

import pytest
import torch
from torch import nn

from gradwatch.telemetry import stats, tags
from gradwatch.telemetry.callback import GradientTelemetry
from gradwatch.telemetry.stats import ActivationStats, GradientStats, UpdateRatio, activation_stats, gradient_stats

STATS = tags.GRAD_STATS


@pytest.fixture(params=["kernels", "torch", "in_place"])
def path(request, monkeypatch):
    """Every implementation: the CPU kernels (float32 CPU tensors), torch operations, and torch
    operations counting activations in place as on a GPU (no sign buffers)."""
    monkeypatch.setattr(stats, "HOST_KERNELS", request.param == "kernels")
    if request.param == "in_place":
        monkeypatch.setattr(stats, "SIGN_BUFFER_DEVICES", frozenset())
    return request.param


def test_float32_cpu_tensors_take_the_kernels_and_others_torch(path):
    kernels = path == "kernels"
    grads = [torch.randn(4, 3), torch.randn(3)]
    assert (GradientStats([12, 3]).pending(grads)[1] is None) == kernels
    ratio = UpdateRatio([12, 3])
    assert (ratio.pending(ratio.before(grads), grads)[1] is None) == kernels
    acts = ActivationStats([(4, 3)])
    assert (acts.pending([torch.rand(4, 3)])[1] is None) == kernels
    # Never for what the kernels cannot read: bf16, float64, a transposed (non-contiguous) view.
    for other in ([g.bfloat16() for g in grads], [g.double() for g in grads], [grads[0].t(), grads[1]]):
        assert GradientStats([12, 3]).pending(other)[1] is not None
    assert acts.pending([torch.rand(3, 4).t()])[1] is not None


def reference(grad: torch.Tensor) -> list[float]:
    """float64 torch, one reduction at a time."""
    g = grad.double()
    std = g.std().item() if g.numel() > 1 else 0.0
    return [g.mean().item(), std, (g == 0).double().mean().item(), g.norm().item(), g.abs().max().item(),
            float((~torch.isfinite(g)).sum())]


@pytest.mark.parametrize("scale", [1e-38, 1e-30, 1e-20, 1.0, 1e20, 1e31, 1e38 / 8])
@pytest.mark.usefixtures("path")
def test_float32_gradients_at_any_magnitude_equal_float64(scale):
    torch.manual_seed(0)
    grads = [torch.randn(64, 30) * scale, torch.randn(30) * scale, torch.randn(1) * scale, torch.zeros(5),
             (torch.randn(3, 3) * scale).where(torch.rand(3, 3) > 0.5, 0.0)]
    table = gradient_stats(grads)
    for i, grad in enumerate(grads):
        assert table[i].tolist() == pytest.approx(reference(grad), rel=1e-5, abs=0), (scale, i)
        assert table[i, STATS.index("norm")] >= table[i, STATS.index("abs_max")]
    expected = math.sqrt(sum((g.double() ** 2).sum().item() for g in grads))
    assert table[-1, STATS.index("norm")].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.usefixtures("path")
def test_linear_model_on_inputs_of_extreme_scale():
    # Vanishing and exploding gradients through a real backward pass: inputs at 1e-30 and 1e31.
    for scale in (1e-30, 1e31):
        torch.manual_seed(1)
        model = nn.Linear(8, 1, bias=False)
        x = torch.randn(16, 8) * scale
        model(x).sum().backward()
        (row,) = gradient_stats([model.weight.grad])[:1]
        assert row.tolist() == pytest.approx(reference(model.weight.grad), rel=1e-5, abs=0)
        assert math.isfinite(row[STATS.index("norm")]) and row[STATS.index("norm")] >= row[STATS.index("abs_max")]


@pytest.mark.usefixtures("path")
def test_std_of_a_large_mean_and_across_chunks_equals_float64():
    # A mean 1e7 times the spread (where a one-pass sum of squares loses every digit), sizes
    # around the kernels' 2048-value chunks, one value, and inf or NaN first.
    torch.manual_seed(5)
    grads = [1e4 + 1e-3 * torch.randn(100_003), torch.randn(2047), torch.randn(2048) - 7, torch.randn(2049),
             torch.randn(6149) * 1e-30 + 1e-29, torch.tensor([3.0]), torch.full((4097,), 0.1)]
    table = gradient_stats(grads)
    for i, grad in enumerate(grads):
        assert table[i].tolist() == pytest.approx(reference(grad), rel=1e-5, abs=0), i
    assert table[len(grads) - 1, STATS.index("std")] == 0.0  # a constant: exactly 0
    for first in (float("inf"), float("nan")):
        grad = torch.cat([torch.tensor([first]), torch.randn(5000)])
        row = gradient_stats([grad])[0].tolist()
        assert row[STATS.index("nonfinite")] == 1 and (row[0] == first or math.isnan(first) and math.isnan(row[0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients_widen_exactly(dtype):
    torch.manual_seed(2)
    # 4096 + 1 elements with 1221 zeros: a bf16 count would round the zero fraction.
    grad = torch.randn(4097).to(dtype)
    grad[torch.randperm(4097)[:1221]] = 0
    row = gradient_stats([grad, torch.randn(4097).to(dtype)])[0]
    assert row[STATS.index("zero_fraction")].item() == 1221 / 4097
    assert row.tolist() == pytest.approx(reference(grad), rel=1e-5, abs=0)


@pytest.mark.usefixtures("path")
def test_nonfinite_counted_without_poisoning_the_rest():
    table = gradient_stats([torch.tensor([float("inf"), 1.0, 0.0, float("nan")]), torch.tensor([3.0, -4.0])])
    assert table[0, STATS.index("nonfinite")] == 2 and table[0, STATS.index("zero_fraction")] == 0.25
    assert table[1].tolist() == pytest.approx(reference(torch.tensor([3.0, -4.0])))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.usefixtures("path")
def test_activation_fractions_exact_in_half_precision(dtype):
    torch.manual_seed(3)
    out = torch.relu(torch.randn(97, 211)).to(dtype)  # 97 samples: not a multiple of the kernel's 4
    out[:, :13] = 0  # 13 dead units
    out[-1, 13] = 1.0  # unit 13 fires in the last sample only
    out[:-1, 13] = 0
    rows, fired = activation_stats([out])
    assert rows[0, 0].item() == 13 / 211
    assert rows[0, 1].item() == (out == 0).sum().item() / out.numel()
    assert fired.tolist() == (out > 0).any(dim=0).tolist()


@pytest.mark.usefixtures("path")
def test_convolution_channels_are_units_and_calls_concatenate():
    conv = torch.relu(torch.randn(4, 6, 5, 5))
    conv[:, 2] = 0  # channel 2 never fires
    conv[1:, 4] = 0  # channel 4 fires in sample 0 only: alive
    rows, fired = activation_stats([conv])
    assert rows[0].tolist() == [1 / 6, (conv == 0).sum().item() / conv.numel()]
    assert fired.tolist() == [True, True, False, True, True, True]
    # One module called twice: unit 0 fires only in the second call, so it is alive.
    first, second = torch.zeros(3, 2), torch.tensor([[1.0, 0.0]])
    rows, fired = activation_stats([[first, second]])
    assert rows[0].tolist() == [0.5, 7 / 8] and fired.tolist() == [True, False]
    # Calls with different positions are pooled too.
    rows, _ = activation_stats([[torch.zeros(2, 3, 4, 4), torch.ones(1, 3, 2, 2)]])
    assert rows[0, 0] == 0.0


def test_calls_counted_apart_as_on_a_gpu_make_no_concatenated_copy(monkeypatch):
    # A block's ReLU called twice (as in a ResNet): where the outputs are counted in place (a
    # GPU), each call is counted where it lies and the per-unit counts added; the numbers equal
    # those of the calls concatenated, and no copy of the outputs is made.
    from gradwatch.telemetry.dispatch_count import TorchOps

    torch.manual_seed(5)
    first = torch.relu(torch.randn(6, 5, 4, 4))
    second = torch.relu(torch.randn(6, 5, 4, 4))
    first[:, 1], second[:, 1] = 0, 0  # channel 1 dead in both calls
    second[:, 3] = 0  # channel 3 fires in the first call only: alive
    other = [torch.relu(torch.randn(2, 5, 3, 3)), torch.relu(torch.randn(1, 5, 2, 2))]  # positions differ
    outputs = [(first, second), tuple(other)]
    expected = activation_stats([stats.unit_view(list(o)) for o in outputs])
    monkeypatch.setattr(stats, "HOST_KERNELS", False)
    monkeypatch.setattr(stats, "SIGN_BUFFER_DEVICES", frozenset())
    counter = ActivationStats([stats.unit_shape(o) for o in outputs])
    assert [stats.unit_shape(o) for o in outputs] == [(12, 5, 16), (1, 5, 22)]
    with TorchOps() as ops:
        rows, fired = counter(outputs)
    assert rows.tolist() == expected[0].tolist() and fired.tolist() == expected[1].tolist()
    assert rows[0].tolist() == [1 / 5, ((first == 0).sum() + (second == 0).sum()).item() / (2 * first.numel())]
    # Made: a boolean per output value, one call at a time (each freed at once), and per-unit
    # counts; the calls concatenated would make a float32 copy of them all (4 bytes a value).
    booleans = sum(call.numel() for call in (first, second, *other))
    assert booleans < ops.bytes <= booleans + 1024
    # Outputs in channels-last layout are counted as they lie too: the same numbers, no copy.
    last = [(first.to(memory_format=torch.channels_last), second.to(memory_format=torch.channels_last)),
            tuple(o.to(memory_format=torch.channels_last) for o in other)]
    with TorchOps() as ops:
        rows, fired = counter(last)
    assert rows.tolist() == expected[0].tolist() and fired.tolist() == expected[1].tolist()
    assert booleans < ops.bytes <= booleans + 1024


@pytest.mark.usefixtures("path")
def test_update_ratio_equals_the_weights_change():
    w = [torch.randn(50, 40), torch.randn(40), torch.zeros(3), torch.randn(1)]
    ratio = UpdateRatio([t.numel() for t in w])
    kept = ratio.before(w)
    after = [t + 0.01 * torch.randn_like(t) for t in w[:2]] + [w[2], w[3] * 2]
    got = ratio(kept, after).tolist()
    expected = [((a.double() - b.double()).norm() / b.double().norm()).item() for a, b in zip(after, w, strict=True)]
    assert got[:2] == pytest.approx(expected[:2], rel=1e-5)
    assert got[2] == 0.0 and got[3] == pytest.approx(1.0)  # unmoved zeros: 0, not NaN


def test_statistics_on_meta_tensors_make_nothing_elsewhere():
    # Shape inference only: any tensor made without the inputs' device would be CPU and raise.
    grads = [torch.empty(s, device="meta") for s in ((32, 2), (32,), (32, 32), (32, 32), (1, 32), (1,))]
    table = GradientStats([g.numel() for g in grads])(grads)
    assert table.device.type == "meta" and table.shape == (len(grads) + 1, len(STATS))
    half = [g.to(torch.bfloat16) for g in grads]
    assert GradientStats([g.numel() for g in half])(half).device.type == "meta"
    outs = [torch.empty(8, 32, device="meta"), [torch.empty(8, 4, 3, 3, device="meta")] * 2]
    stats = ActivationStats([(8, 32), (16, 4, 9)])
    rows, fired = stats(outs)
    assert rows.device.type == fired.device.type == "meta" and rows.shape == (2, 2) and fired.shape == (36,)
    assert stats.epoch_dead_fraction(fired).device.type == "meta"
    ratio = UpdateRatio([g.numel() for g in grads])
    assert ratio(ratio.before(grads), grads).device.type == "meta"


def squared_output(net: nn.Module, lr: float):
    """A Lightning module training `net` on the mean of its squared output, SGD at `lr`."""
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            return self.net(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    return Module()


class StepsRecorder:
    """What the callback hands a recorder, one dict of tag -> value per logged step."""

    def __init__(self):
        self.steps = []

    def add(self, names, values, step=None, on_read=None):
        self.steps.append(dict(zip(names, values.tolist(), strict=True)))

    def add_layout(self, layout):
        self.layout = layout


class Reversed(nn.Module):
    """ReLUs registered in the opposite order to their calls, and one ReLU called twice."""

    def __init__(self):
        super().__init__()
        self.late = nn.ReLU()
        self.early = nn.ReLU()
        self.twice = nn.ReLU()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 1)

    def forward(self, x):
        h = self.early(self.a(x))
        h = self.late(self.b(h))
        return self.c(self.twice(h) + self.twice(-h))


def test_callback_keys_activations_by_module_and_transfers_once(monkeypatch, path):
    import lightning.pytorch as pl

    torch.manual_seed(4)
    net = Reversed()
    with torch.no_grad():
        net.a.bias[:2] = -100.0  # early: units 0 and 1 dead
        net.b.bias[:] = -100.0  # late: every unit dead; so twice(h) and twice(-h) are all zero
    x = torch.rand(8, 3)

    recorder = StepsRecorder()
    telemetry = GradientTelemetry(recorder)
    transfers = {"cpu": 0, "item": 0, "bool": 0}
    hooks = (("cpu", "cpu"), ("item", "item"), ("bool", "__bool__"))
    real = {name: getattr(torch.Tensor, attr) for name, attr in hooks}

    def counting(name):
        def call(self, *args, **kwargs):
            transfers[name] += 1
            return real[name](self, *args, **kwargs)
        return call

    def counted(hook):
        def run(*args, **kwargs):
            with monkeypatch.context() as patch:
                for name, attr in hooks:
                    patch.setattr(torch.Tensor, attr, counting(name))
                return hook(*args, **kwargs)
        return run

    for hook in ("on_train_batch_start", "on_before_optimizer_step", "_after_optimizer_step", "on_train_batch_end"):
        setattr(telemetry, hook, counted(getattr(telemetry, hook)))
    trainer = pl.Trainer(max_steps=2, callbacks=[telemetry], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(squared_output(net, lr=0.0), train_dataloaders=torch.utils.data.DataLoader([x], batch_size=None))
    # One per logged step; none where the CPU kernels left everything on the host already.
    assert transfers == {"cpu": 0 if path == "kernels" else 2, "item": 0, "bool": 0}
    step = recorder.steps[0]
    early = (net.a(x) > 0).any(dim=0)
    assert step["act/net.early/dead_fraction"] == (~early).sum().item() / 4 == 0.5
    assert step["act/net.late/dead_fraction"] == 1.0
    assert step["act/net.twice/dead_fraction"] == 1.0 and step["act/net.twice/zero_fraction"] == 1.0
    assert step["update/net.a.weight/ratio"] == 0.0  # lr 0: nothing moved


@pytest.mark.parametrize("every", [1, 2])
def test_update_ratio_of_every_logged_step_equals_the_weights_change(path, every):
    """Steps logged one after another carry the weights after a step over as the next step's
    weights before it (both paths); SGD with momentum and weight decay, so an update is not a
    multiple of its gradient."""
    import lightning.pytorch as pl

    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    x, y = torch.randn(32, 3), torch.randn(32, 1)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)

    weights = []  # after each step, float64; the first entry: before step 0

    class Snapshot(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not weights:
                weights.append({n: p.detach().double().clone() for n, p in net.named_parameters()})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            weights.append({n: p.detach().double().clone() for n, p in net.named_parameters()})

    recorder = StepsRecorder()
    trainer = pl.Trainer(max_steps=6, callbacks=[Snapshot(), GradientTelemetry(recorder, every_n_steps=every)],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(Module(), train_dataloaders=torch.utils.data.DataLoader([(x, y)], batch_size=None))
    logged = recorder.steps
    assert len(logged) == 6 // every
    for number, values in enumerate(logged):
        step = number * every
        for name in weights[0]:
            before, after = weights[step][name], weights[step + 1][name]
            expected = ((after - before).norm() / before.norm()).item()
            assert values[f"update/net.{name}/ratio"] == pytest.approx(expected, rel=1e-6), (step, name)


@pytest.mark.usefixtures("path")
def test_epoch_mask_starts_anew_each_epoch():
    """The callback's protocol: `fired` passed from step to step within an epoch, None at an
    epoch's first step; the epoch dead fraction counts the units that fired in none of its steps."""
    stats = ActivationStats([(2, 3)])
    fires = {0: torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), 1: torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]),
             2: torch.zeros(2, 3)}
    epochs = [[fires[0], fires[1]], [fires[2], fires[1]], [fires[0], fires[0]]]
    expected = [1 / 3, 2 / 3, 2 / 3]
    for outputs, dead in zip(epochs, expected, strict=True):
        fired = None
        for output in outputs:
            rows, _, fired = stats.pending([output], fired=fired)
        assert stats.epoch_dead_fraction(fired).tolist() == [dead]
        assert fired.tolist() == [any(o[:, u].gt(0).any().item() for o in outputs) for u in range(3)]
    # Another object's mask (a last batch of another size) is OR-ed in, not overwritten.
    other = ActivationStats([(1, 3)])
    _, _, fired = stats.pending([fires[0]])
    _, _, fired = other.pending([torch.tensor([[0.0, 0.0, 5.0]])], fired=fired)
    assert fired.tolist() == [True, False, True] and other.epoch_dead_fraction(fired).tolist() == [1 / 3]


@pytest.mark.parametrize("module", [nn.ReLU(), nn.ReLU(inplace=True), nn.ReLU6()])
def test_output_tap_returns_what_the_module_returns_and_keeps_it_while_recording(module):
    """The tap wraps the module's own forward (nn.ReLU's inline, in place or not; any other
    through its class); a deep copy calls its own forward; removing the tap restores the module."""
    import copy

    from gradwatch.telemetry.callback import _OutputTap

    class Owner:
        _recording = True

    owner, calls = Owner(), []
    x = torch.randn(4, 5) * 10
    expected = type(module)(*([module.inplace] if isinstance(module, nn.ReLU) else []))(x.clone())
    tap = _OutputTap(module, calls, owner)
    out = module(x.clone())
    assert torch.equal(out, expected) and len(calls) == 1 and calls[0] is out
    owner._recording = False
    module(x.clone())
    assert len(calls) == 1
    twin = copy.deepcopy(module)
    assert torch.equal(twin(x.clone()), expected)
    tap.remove()
    assert "forward" not in module.__dict__ and torch.equal(module(x.clone()), expected)


class SharedReLU(nn.Module):
    """One `nn.ReLU` after layers of widths 8, 16 and 8 (the `self.relu` of many models)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.head = nn.Linear(3, 8), nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.head(self.relu(self.c(self.relu(self.b(self.relu(self.a(x)))))))


@pytest.mark.parametrize("route", ["kernels", "torch", "in_place", "device"])
def test_a_relu_shared_by_layers_of_several_widths_is_one_row_over_all_their_units(monkeypatch, route):
    # Its calls of one width are the same units (as any module called several times), its calls
    # of another width other units: dead units over all of them, zeros over all its outputs, an
    # epoch's never-fired units likewise; on every path, against float64 from the outputs a
    # forward hook of its own saw.
    import lightning.pytorch as pl

    monkeypatch.setattr(stats, "HOST_KERNELS", route == "kernels")
    if route == "in_place":
        monkeypatch.setattr(stats, "SIGN_BUFFER_DEVICES", frozenset())
    if route == "device":
        gpu = pytest.importorskip("gradwatch.telemetry.gpu")
        if not gpu.interpreting():
            pytest.skip("triton does not interpret here")
        monkeypatch.setattr(stats, "DEVICE_KERNELS_ON_CPU", True)
    torch.manual_seed(6)
    net = SharedReLU()
    with torch.no_grad():
        net.a.bias[:2] = -100.0  # width 8: units 0 and 1 silent in the first call...
        net.c.bias[0] = -100.0  # ...and unit 0 in the third: dead; unit 1 fires there
        net.b.bias[:4] = -100.0  # width 16: 4 dead
    seen = []
    net.relu.register_forward_hook(lambda module, args, output: seen.append(output.detach().double().clone()))
    batches = [torch.rand(8, 3), torch.rand(8, 3)]

    recorder = StepsRecorder()
    trainer = pl.Trainer(max_steps=2, callbacks=[GradientTelemetry(recorder)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu")
    trainer.fit(squared_output(net, lr=0.5), train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert len(seen) == 6 and len(recorder.steps) == 2
    fired_epoch = {8: torch.zeros(8, dtype=torch.bool), 16: torch.zeros(16, dtype=torch.bool)}
    for step, calls in zip(recorder.steps, (seen[:3], seen[3:]), strict=True):
        fired = {8: (calls[0] > 0).any(0) | (calls[2] > 0).any(0), 16: (calls[1] > 0).any(0)}
        dead = sum(int((~f).sum()) for f in fired.values())
        zeros = sum(int((c == 0).sum()) for c in calls)
        assert step["act/net.relu/dead_fraction"] == dead / 24
        assert step["act/net.relu/zero_fraction"] == zeros / sum(c.numel() for c in calls)
        for width in fired_epoch:
            fired_epoch[width] |= fired[width]
    assert dead >= 5  # units 0 (width 8) and 0-3 (width 16) at least
    never = sum(int((~f).sum()) for f in fired_epoch.values())
    assert recorder.steps[1]["act/net.relu/dead_fraction_epoch"] == never / 24
    assert "act/net.relu/dead_fraction_epoch" not in recorder.steps[0]
