"""The multi-tensor GPU kernels (gradwatch.telemetry.gpu) against float64 torch.

On CUDA where there is a GPU; otherwise on CPU tensors through Triton's interpreter, which
tests/conftest.py turns on before triton is imported. Chunks of a few values (`SMALL`) make
small tensors span many chunks and programs, so the interpreter stays fast.
"""

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the GPU kernels cannot be tested")

from gradwatch.telemetry import gpu, stats, tags  # noqa: E402
from gradwatch.telemetry.dispatch_count import Launches, TorchOps  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not gpu.interpreting():
    pytest.skip("no GPU, and triton was imported without TRITON_INTERPRET=1 (tests/conftest.py sets it)",
                allow_module_level=True)

SMALL = {"block": 16, "chunk": 64}
STATS = tags.GRAD_STATS


def reference(grad: torch.Tensor) -> list[float]:
    """float64 torch, one reduction at a time."""
    g = grad.double()
    std = g.std().item() if g.numel() > 1 else 0.0
    return [g.mean().item(), std, (g == 0).double().mean().item(), g.norm().item(), g.abs().max().item(),
            float((~torch.isfinite(g)).sum())]


def kernel_rows(grads: list[torch.Tensor], **layout) -> np.ndarray:
    """(tensors + 1, 6): the kernels' rows, then the global norm in the norm column."""
    sums = gpu.GradientSums([g.numel() for g in grads], [g.dtype for g in grads], grads[0].device,
                            **(layout or SMALL))
    flat = gpu.finish_gradient_rows(sums(grads).cpu().numpy(), np.array([g.numel() for g in grads], dtype=float))
    table = np.zeros((len(grads) + 1, len(STATS)))
    table[:-1] = flat[:-1].reshape(-1, len(STATS))
    table[-1, STATS.index("norm")] = flat[-1]
    return table


def assert_rows(grads: list[torch.Tensor], rel: float = 1e-12, **layout) -> np.ndarray:
    table = kernel_rows(grads, **layout)
    for i, grad in enumerate(grads):
        assert table[i].tolist() == pytest.approx(reference(grad), rel=rel, abs=0, nan_ok=True), i
    expected = math.sqrt(sum((g.double() ** 2).sum().item() for g in grads))
    assert table[-1, STATS.index("norm")] == pytest.approx(expected, rel=rel, nan_ok=True)
    return table


def on(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("scale", [1e-38, 1e-30, 1.0, 1e30, 1e38 / 8])
def test_float32_at_any_magnitude_equals_float64(scale):
    torch.manual_seed(0)
    grads = on(torch.randn(64, 30) * scale, torch.randn(30) * scale, torch.randn(1) * scale, torch.zeros(5),
               (torch.randn(9, 7) * scale).where(torch.rand(9, 7) > 0.5, 0.0))
    table = assert_rows(grads)
    assert (table[:-1, STATS.index("norm")] >= table[:-1, STATS.index("abs_max")]).all()
    assert table[4, STATS.index("zero_fraction")] == (grads[4] == 0).sum().item() / 63  # an exact count


def test_half_precision_and_float64_in_one_call_equal_float64():
    # One launch per dtype; bf16 and fp16 widen exactly, float64 keeps its digits.
    torch.manual_seed(1)
    half = torch.randn(4097).to(torch.bfloat16)
    half[torch.randperm(4097)[:1221]] = 0
    grads = on(half, torch.randn(300).half() * 1e-4, torch.randn(77).double() * 1e100, torch.randn(50),
               torch.randn(3, 5).bfloat16() * 1e30, torch.tensor([65504.0, -65504.0]).half())
    table = assert_rows(grads)
    assert table[0, STATS.index("zero_fraction")] == 1221 / 4097


def test_std_of_a_large_mean_and_tensors_across_many_chunks():
    # A mean 1e7 times the spread (a one-pass sum of squares loses every digit); a tensor of
    # more chunks than the merge reads at a time (258 > MERGE_BLOCK); sizes around a block.
    torch.manual_seed(2)
    grads = on(1e4 + 1e-3 * torch.randn(5003), torch.randn(16_500) - 7, torch.randn(15), torch.randn(16),
               torch.randn(17), torch.full((129,), 0.1), torch.randn(1000).bfloat16() + 300)
    table = assert_rows(grads, rel=1e-9)
    assert table[5, STATS.index("std")] == 0.0  # a constant: exactly 0


def test_one_value_empty_and_zero_tensors():
    grads = on(torch.tensor([3.0]), torch.zeros(0), torch.zeros(7), torch.zeros(1).bfloat16(), torch.tensor([-2.5]))
    table = kernel_rows(grads)
    assert table[0].tolist() == [3.0, 0.0, 0.0, 3.0, 3.0, 0.0]
    # Empty: mean, std and zero fraction NaN, as the torch operations give; no norm, nothing non-finite.
    assert np.isnan(table[1, :3]).all() and table[1, 3:].tolist() == [0.0, 0.0, 0.0]
    assert table[2].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert table[3].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert table[4].tolist() == [-2.5, 0.0, 0.0, 2.5, 2.5, 0.0]
    assert table[-1, STATS.index("norm")] == pytest.approx(math.sqrt(9 + 6.25), rel=1e-15)


def test_nonfinite_counts_and_their_rows_as_torch():
    torch.manual_seed(3)
    late = torch.randn(500)
    late[400] = float("inf")  # in a later chunk than the first
    grads = on(torch.tensor([float("inf"), 1.0, 0.0, float("nan")]), torch.cat([torch.tensor([float("inf")]),
               torch.randn(300)]), torch.cat([torch.tensor([float("-inf")]), torch.randn(300)]).bfloat16(),
               late, torch.tensor([float("nan")] * 3).half(), torch.tensor([3.0, -4.0]))
    table = assert_rows(grads)
    assert table[:, STATS.index("nonfinite")].tolist() == [2, 1, 1, 1, 3, 0, 0]
    assert table[1, 0] == math.inf and table[2, 0] == -math.inf  # a sum that meets inf stays inf
    assert math.isnan(table[0, STATS.index("abs_max")]) and table[1, STATS.index("abs_max")] == math.inf


def test_many_tensors_of_mixed_sizes_and_dtypes():
    torch.manual_seed(4)
    sizes = [int(n) for n in torch.randint(1, 100, (200,))]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    grads = on(*[torch.randn(n).to(dtypes[i % 3]) * 10.0 ** (i % 7 - 3) for i, n in enumerate(sizes)])
    assert_rows(grads, block=64, chunk=128)


@pytest.mark.slow
def test_a_tensor_past_float32_counts():
    # 2**24 + 1 zeros: a float32 count would round them to 2**24. Big blocks keep the interpreter
    # to a few seconds; on CUDA the kernels' own layout.
    grad = torch.zeros(2**24 + 3, device=DEVICE)
    grad[5], grad[-1] = 1.5, -2.0
    layout = {"block": gpu.BLOCK, "chunk": gpu.CHUNK} if DEVICE == "cuda" else {"block": 65536, "chunk": 2**20}
    table = assert_rows([grad, grad[:1000].clone().bfloat16()], **layout)
    assert table[0, STATS.index("zero_fraction")] == (2**24 + 1) / (2**24 + 3)


def reference_ratio(before: torch.Tensor, after: torch.Tensor) -> float:
    moved = (after.double() - before.double()).norm().item()
    if moved == 0:
        return 0.0
    return math.inf if before.abs().max() == 0 else moved / before.double().norm().item()


@pytest.mark.parametrize("carry", [False, True])
def test_update_ratio_equals_the_weights_change(carry):
    torch.manual_seed(5)
    weights = on(torch.randn(50, 40), torch.randn(40).bfloat16(), torch.zeros(3), torch.randn(1).half(),
                 torch.randn(700).double(), torch.zeros(2))
    norms = gpu.UpdateNorms([w.numel() for w in weights], [w.dtype for w in weights], weights[0].device, **SMALL)
    kept = norms.keep(weights)
    for step in range(2):
        after = [w + (0.01 * torch.randn_like(w)).to(w.dtype) for w in weights[:2]] + [
            weights[2], weights[3] * 2, weights[4] * (1 + 1e-9), weights[5] + 1]
        ratio = gpu.finish_update_ratio(kept(after, carry=carry).cpu().numpy())
        expected = [reference_ratio(b, a) for b, a in zip(weights, after, strict=True)]
        assert ratio.tolist() == pytest.approx(expected, rel=1e-12), step
        assert ratio[2] == 0.0 and ratio[5] == (math.inf if step == 0 else 1.0)  # zeros unmoved: 0, moved: inf
        if not carry:
            break
        # Carried: the buffer now holds the weights after, in their own dtype, for the next step.
        assert all(torch.equal(v, a) for v, a in zip(kept.views, after, strict=True))
        weights = after
    assert kept.kept[0].dtype == torch.float32 and {k.dtype for k in kept.kept} == {
        torch.float32, torch.bfloat16, torch.float16, torch.float64}


@pytest.fixture
def device_path(monkeypatch):
    """GradientStats and UpdateRatio on the device kernels, CPU tensors included (interpreted)."""
    monkeypatch.setattr(stats, "DEVICE_KERNELS_ON_CPU", True)
    monkeypatch.setattr(stats, "HOST_KERNELS", False)


def model(tensors: int) -> list[torch.Tensor]:
    """`tensors` weights of a few sizes, float32 and bf16 (two dtypes: three launches a statistic)."""
    return [torch.randn(16 + i % 5, 8, device=DEVICE).to(torch.bfloat16 if i % 4 == 0 else torch.float32)
            for i in range(tensors)]


@pytest.mark.usefixtures("device_path")
@pytest.mark.parametrize("tensors", [6, 150])
def test_a_logged_step_launches_a_fixed_number_of_kernels_and_allocates_nothing(monkeypatch, tensors):
    weights = model(tensors)
    grads = [torch.randn_like(w) for w in weights]
    sizes = [w.numel() for w in weights]
    grad_stats, ratio = stats.GradientStats(sizes), stats.UpdateRatio(sizes)
    for step in range(3):
        if step == 1:  # the plans are made (and the kernels built) at the first step
            for plan in (grad_stats._device[1], ratio._device[1]):
                monkeypatch.setattr(plan, "_chunks", Launches())
                monkeypatch.setattr(plan, "_merge", Launches())
            Launches.count = 0
        with TorchOps() as ops:
            kept = ratio.before(weights, reuse=step > 1)
            values, finish = grad_stats.pending(grads)
            with torch.no_grad():
                torch._foreach_add_(weights, 0.01)  # the optimizer, not counted below
            update, _ = ratio.pending(kept, weights, carry=True)
        ops.names.remove("aten._foreach_add_.Scalar")
        if step == 0:
            # The plans: a copy of the weights in their dtypes, and O(tensors + chunks) of tables and sums.
            weight_bytes = sum(w.numel() * w.element_size() for w in weights)
            assert weight_bytes <= ops.bytes <= weight_bytes + 200 * tensors + 4096
            continue
        assert isinstance(values, torch.Tensor) and values.device == weights[0].device
        assert update.shape == (2, tensors) and values.shape == (gpu.GRADIENT_FIELDS, tensors)
        # Two dtypes: two chunk launches and a merge for each statistic, whatever the tensors.
        assert Launches.count == 6 * step
        # No torch operation but the weights' copy before a step that does not carry it over, so
        # nothing allocated and nothing read back (no .item(), .cpu() or copy to the host).
        assert ops.names == (["aten._foreach_copy_.default"] if step == 1 else []) and ops.bytes == 0


@pytest.mark.usefixtures("device_path")
def test_gradient_stats_and_update_ratio_through_the_device_kernels_equal_float64():
    torch.manual_seed(6)
    grads = [torch.randn(40, 3).bfloat16(), torch.randn(5).half() * 1e-3, torch.randn(1).bfloat16(),
             1e4 + torch.randn(300, dtype=torch.float64)]
    grads = [g.to(DEVICE) for g in grads]
    gradient_stats = stats.GradientStats([g.numel() for g in grads])
    values, finish = gradient_stats.pending(grads)
    assert finish == gradient_stats._finish_device
    table = gradient_stats(grads)
    for i, grad in enumerate(grads):
        assert table[i].tolist() == pytest.approx(reference(grad), rel=1e-12)
    ratio = stats.UpdateRatio([g.numel() for g in grads])
    kept = ratio.before(grads)
    assert isinstance(kept, gpu.UpdateNorms)
    after = [g * 1.5 for g in grads]
    expected = [reference_ratio(b, a) for b, a in zip(grads, after, strict=True)]
    assert ratio(kept, after).tolist() == pytest.approx(expected, rel=1e-12)


@pytest.mark.slow
def test_the_kernels_build_for_a_gpu_without_one(tmp_path):
    # Triton compiles for an H100/H200 (sm_90) here, through its bundled ptxas, with no GPU: what
    # the interpreter cannot check (types, loops, pointer casts in the compiled language).
    script = textwrap.dedent("""
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from gradwatch.telemetry import gpu
        table = {"addresses": "*i64", "sizes": "*i64", "offsets": "*i64", "owner": "*i32", "first": "*i64",
                 "partials": "*fp64", "stride": "i64", "base": "i64", "bounds": "*i64", "rows": "*i64",
                 "out": "*fp64", "tensors": "i32", "calls": "*i64", "programs": "*i64", "per_unit": "*i32",
                 "counts": "*i32", "layers": "*i64", "earlier": "*u8", "fired": "*u8", "n_layers": "i32"}
        pointer = {tl.float32: "*fp32", tl.bfloat16: "*bf16", tl.float16: "*fp16", tl.float64: "*fp64"}
        def build(function, constants, warps=4, **types):
            kernel = gpu._kernel(function)
            names = kernel.arg_names
            signature = {n: "constexpr" if n in constants else types.get(n, table.get(n)) for n in names}
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                      target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
            assert compiled.asm["cubin"], function.__name__
        # stride and base: int32 as triton passes small ints, int64 past 2^31 chunks' columns.
        for dtype, width in zip(pointer, ["i32", "i64", "i32", "i64"]):
            build(gpu._gradient_chunks, {"DTYPE": dtype, "BLOCK": gpu.BLOCK, "CHUNK": gpu.CHUNK}, gpu.GRADIENT_WARPS,
                  stride=width, base=width)
            for carry in (False, True):
                build(gpu._change_chunks, {"CARRY": carry, "DTYPE": dtype, "BLOCK": gpu.BLOCK, "CHUNK": gpu.CHUNK},
                      kept=pointer[dtype], stride=width, base=width)
            for inner in (False, True):
                build(gpu._unit_counts, {"UNITS_INNER": inner, "DTYPE": dtype, "BLOCK_U": gpu.UNIT_BLOCK,
                                         "BLOCK_O": gpu.OTHER_BLOCK, "STEPS": gpu.OTHER_STEPS})
        for earlier in (False, True):
            for counts in ("*i32", "*fp64"):  # one process; summed over processes
                build(gpu._unit_finish, {"EARLIER": earlier, "BLOCK": gpu.FINISH_BLOCK}, counts=counts)
        build(gpu._gradient_merge, {"BLOCK": gpu.MERGE_BLOCK})
        build(gpu._change_merge, {"BLOCK": gpu.MERGE_BLOCK})
        print("built")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "built", run.stderr[-3000:]


@pytest.mark.usefixtures("device_path")
def test_gradients_at_new_addresses_are_read_there():
    # A step's gradients are new tensors (set_to_none): the address table follows them, and
    # tensors back at the last addresses are read as they are now.
    torch.manual_seed(7)
    sizes = [70, 3, 130]
    gradient_stats = stats.GradientStats(sizes)
    first = [torch.randn(n, device=DEVICE).bfloat16() for n in sizes]
    for grads in (first, [torch.randn(n, device=DEVICE).bfloat16() * 3 for n in sizes], first):
        values, finish = gradient_stats.pending(grads)
        rows = finish(values.cpu().numpy())[:-1].reshape(len(sizes), len(STATS))
        for row, grad in zip(rows, grads, strict=True):
            assert row.tolist() == pytest.approx(reference(grad), rel=1e-12)
        with torch.no_grad():
            first[0].mul_(-2)  # changed in place at the same address


@pytest.mark.usefixtures("device_path")
def test_buffers_are_freed_when_the_statistics_are_dropped_without_the_garbage_collector():
    # No reference cycle holds the buffers: a fit's objects dropped, their memory is free at once.
    import gc
    import weakref

    weights = model(5)
    sizes = [w.numel() for w in weights]
    gc.disable()
    try:
        grad_stats, ratio = stats.GradientStats(sizes), stats.UpdateRatio(sizes)
        kept = ratio.before(weights)
        values, finish = grad_stats.pending([torch.randn_like(w) for w in weights])
        update, update_finish = ratio.pending(kept, weights, carry=True)
        buffers = [weakref.ref(t) for t in (values, update, kept.kept[0], grad_stats._device[1].partials)]
        del grad_stats, ratio, kept, values, finish, update, update_finish
        assert [ref() for ref in buffers] == [None] * len(buffers)
    finally:
        gc.enable()


@pytest.mark.skipif(DEVICE != "cuda", reason="host synchronisations exist on CUDA only")
def test_a_logged_step_on_cuda_does_not_synchronise():
    weights = model(20)
    grads = [torch.randn_like(w) for w in weights]
    sizes = [w.numel() for w in weights]
    grad_stats, ratio = stats.GradientStats(sizes), stats.UpdateRatio(sizes)
    for step in range(3):
        if step == 2:  # the plans made and the kernels built: now any synchronisation raises
            torch.cuda.set_sync_debug_mode("error")
        try:
            kept = ratio.before(weights, reuse=step > 0)
            grad_stats.pending(grads)
            with torch.no_grad():
                torch._foreach_add_(weights, 0.01)
            ratio.pending(kept, weights, carry=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden, self.relu, self.head = torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.relu(self.hidden(x)))


def fit_and_read(tmp_path, name: str) -> dict:
    """Three logged steps of a Lightning module with GradientTelemetry; every scalar read back."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gradwatch import GradientTelemetry

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(8)
            self.net = Tiny()

        def training_step(self, batch, index):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)

    torch.manual_seed(9)
    data = torch.utils.data.DataLoader([(torch.randn(32, 4), torch.randint(0, 3, (32,)))] * 3, batch_size=None)
    logger = TensorBoardLogger(str(tmp_path), name=name)
    trainer = pl.Trainer(max_steps=3, callbacks=[GradientTelemetry(every_n_steps=1)], logger=logger,
                         accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Module(), train_dataloaders=data)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {t: {e.step: e.value for e in events.Scalars(t)} for t in events.Tags()["scalars"]}


def test_the_callback_logs_through_the_device_kernels_what_the_cpu_kernels_log(tmp_path, monkeypatch):
    # The real callback and TensorBoard files: the Triton path (interpreted here) against the
    # numba kernels, tag by tag and step by step, for the gradients, the update ratio and the
    # activations.
    expected = fit_and_read(tmp_path, "cpu_kernels")
    monkeypatch.setattr(stats, "HOST_KERNELS", False)
    monkeypatch.setattr(stats, "DEVICE_KERNELS_ON_CPU", True)
    calls = []
    for kind in (gpu.GradientSums, gpu.UpdateNorms, gpu.UnitCounts):
        def counted(self, *args, _run=kind.__call__, **kwargs):
            calls.append(type(self).__name__)
            return _run(self, *args, **kwargs)
        monkeypatch.setattr(kind, "__call__", counted)
    got = fit_and_read(tmp_path, "device_kernels")
    # Each step on the device kernels: the statistics and the update ratio; the update ratio's
    # two kernels (with and without carry) also run once when its copy is first made.
    assert calls.count("GradientSums") == 3 and calls.count("UpdateNorms") == 3 + 2
    assert calls.count("UnitCounts") == 3
    compared = [t for t in expected if t.startswith(("grad/", "update/", "act/"))]
    # 4 parameters, the global norm, 4 update ratios, the ReLU's dead and zero fractions at
    # each step and its epoch dead fraction at the epoch's last step.
    assert len(compared) == 4 * len(STATS) + 1 + 4 + 3
    for tag in compared:
        assert sorted(got[tag]) == ([2] if tag.endswith("_epoch") else [0, 1, 2]), tag
        assert got[tag] == pytest.approx(expected[tag], rel=1e-6, abs=1e-30), tag


def test_kernels_that_fail_to_launch_after_others_ran_fall_back_and_numbers_made_stay_readable(monkeypatch,
                                                                                               caplog):
    # The update ratio's kernels built and ran; the gradient statistics' kernel then fails (a
    # compiler or driver error): one warning, torch operations from then on, and the update
    # ratio the kernels measured is still finished on the host.
    monkeypatch.setattr(stats, "HOST_KERNELS", False)
    monkeypatch.setattr(stats, "DEVICE_KERNELS_ON_CPU", True)
    monkeypatch.setattr(stats, "_gpu", None)
    torch.manual_seed(8)
    weights = on(torch.randn(30, 4), torch.randn(4))
    ratio = stats.UpdateRatio([w.numel() for w in weights])
    kept = ratio.before(weights)
    assert isinstance(kept, gpu.UpdateNorms)
    after = [w * 1.25 for w in weights]
    values, finish = ratio.pending(kept, after)

    def broken(self, *args, **kwargs):
        raise RuntimeError("no compiler for this GPU")

    monkeypatch.setattr(gpu.GradientSums, "__call__", broken)
    grads = on(torch.randn(30, 4), torch.randn(4))
    gradient_stats = stats.GradientStats([g.numel() for g in grads])
    with caplog.at_level("WARNING"):
        table = gradient_stats(grads)
    assert [r.getMessage() for r in caplog.records if "Triton kernels unavailable" in r.getMessage()] == [
        "gradient statistics: Triton kernels unavailable (RuntimeError: no compiler for this GPU); "
        "using torch operations"]
    for i, grad in enumerate(grads):
        assert table[i].tolist() == pytest.approx(reference(grad), rel=1e-6)
    expected = [reference_ratio(b, a) for b, a in zip(weights, after, strict=True)]
    assert finish(np.asarray(values.cpu())).tolist() == pytest.approx(expected, rel=1e-12)


def test_an_update_ratio_kernel_that_fails_to_build_with_carry_falls_back_before_the_step(monkeypatch, caplog):
    # Both variants of the update ratio's kernel (with and without `carry`) are built at the
    # first `before`: one that cannot be built there means torch operations from the start, and
    # a later `pending(..., carry=True)` does not fail in the middle of a step.
    monkeypatch.setattr(stats, "HOST_KERNELS", False)
    monkeypatch.setattr(stats, "DEVICE_KERNELS_ON_CPU", True)
    monkeypatch.setattr(stats, "_gpu", None)
    built = gpu.UpdateNorms.__call__

    def no_carry_variant(self, params, carry=False):
        if carry:
            raise RuntimeError("PassManager::run failed")
        return built(self, params, carry)

    monkeypatch.setattr(gpu.UpdateNorms, "__call__", no_carry_variant)
    torch.manual_seed(9)
    weights = on(torch.randn(30, 4), torch.randn(4))
    ratio = stats.UpdateRatio([w.numel() for w in weights])
    with caplog.at_level("WARNING"):
        kept = ratio.before(weights)
    assert not isinstance(kept, gpu.UpdateNorms)
    assert [r.getMessage() for r in caplog.records if "Triton kernels unavailable" in r.getMessage()] == [
        "gradient statistics: Triton kernels unavailable (RuntimeError: PassManager::run failed); "
        "using torch operations"]
    for scale in (1.25, 0.5):
        after = [w * scale for w in weights]
        values, finish = ratio.pending(kept, after, carry=True)
        expected = [reference_ratio(b, a) for b, a in zip(weights, after, strict=True)]
        assert finish(np.asarray(values.cpu())).tolist() == pytest.approx(expected, rel=1e-12)
        weights, kept = after, ratio.before(after, reuse=True)


def reference_activations(outputs: list) -> tuple[list[list[float]], list[bool]]:
    """Per layer (its output, or its calls), float64 torch one layer at a time: (dead_fraction,
    zero_fraction) flattened, and the units that fired, from the calls concatenated (`unit_view`).
    NaN is not a firing."""
    rows, fired = [], []
    for output in outputs:
        joined = stats.unit_view(list(output) if isinstance(output, tuple) else output).double()
        per_unit = (joined > 0).sum(dim=(0, 2))
        rows += [(per_unit == 0).double().mean().item(), (~(joined > 0)).double().mean().item()]
        fired += (per_unit > 0).tolist()
    return rows, fired


def relu(*shape, dtype=torch.float32, dead=(), seed=0) -> torch.Tensor:
    torch.manual_seed(seed)
    output = torch.relu(torch.randn(*shape, device=DEVICE)).to(dtype)
    for unit in dead:
        output[:, unit] = 0
    return output


@pytest.mark.usefixtures("device_path")
def test_activation_counts_through_the_device_kernels_equal_float64():
    # Every layout and dtype the kernels read, layers across several tiles of units and of
    # values, a layer called twice (positions that differ), NaN and inf: the numbers and the
    # units that fired equal float64 torch, and the epoch's mask ORs the steps.
    nan_inf = relu(40, 6, seed=1)
    nan_inf[:, 2], nan_inf[0, 4], nan_inf[3, 5] = float("nan"), float("inf"), float("nan")
    outputs = [
        relu(1100, 70, dead=(3, 69)),  # 3 unit tiles, 2 programs along the samples
        relu(5, 40, 6, 7, dead=(0, 33), seed=2),  # (batch, channels, h, w): positions closer in memory
        relu(5, 40, 6, 7, dtype=torch.bfloat16, seed=3).to(memory_format=torch.channels_last),
        (relu(4, 9, 5, 5, dtype=torch.float16, dead=(1,), seed=4), relu(3, 9, 2, 2, dtype=torch.float16, seed=5)),
        relu(33, dtype=torch.float64, seed=6) * 1e-300,  # one sample: every value a unit; below float32's range
        nan_inf,
        relu(7, 3, 8)[:, :, 2:6],  # a view: positions at one stride, samples not
    ]
    assert gpu.unit_geometry(outputs[-1]) == (7, 3, 4, 24, 8, 1)
    counter = stats.ActivationStats([stats.unit_shape(o) for o in outputs])
    values, finish, fired = counter.pending(outputs)
    assert finish == counter._finish_layer_order and isinstance(counter._device_last[1], gpu.UnitCounts)
    rows, expected_fired = reference_activations(outputs)
    assert finish(values.cpu().numpy()).tolist() == pytest.approx(rows, rel=1e-15)
    assert fired.tolist() == expected_fired
    epoch = counter.epoch_dead_fraction(fired)
    assert epoch.tolist() == pytest.approx(rows[::2], rel=1e-15)
    # The next step: other units dead; the epoch's mask is this step's OR the last.
    second = [o if isinstance(o, tuple) else o.clone() for o in outputs]
    second[0][:, 5] = 0
    second[0][:, 3] = 1.0
    values, finish, fired_both = counter.pending(second, fired=fired)
    rows, now = reference_activations(second)
    assert finish(values.cpu().numpy()).tolist() == pytest.approx(rows, rel=1e-15)
    assert fired_both.tolist() == [a or b for a, b in zip(expected_fired, now, strict=True)]
    union = stats.ActivationStats([stats.unit_shape(o) for o in outputs])._layer_totals[0]
    never = 1 - np.add.reduceat(np.asarray(fired_both.tolist(), dtype=float),
                                np.concatenate([[0], np.cumsum(union)[:-1]]).astype(int)) / union
    assert counter.epoch_dead_fraction(fired_both).tolist() == pytest.approx(never.tolist(), rel=1e-15)
    assert counter.epoch_dead_fraction(fired_both).tolist()[0] == 1 / 70  # unit 69 never fired
    # Two processes with these outputs each (`combine`, as distributed runs sum the per-unit
    # counts): the same fractions, of twice the outputs.
    shards = []

    def combine(per_unit):
        shards.append(per_unit.clone())
        return per_unit.double() * 2, 2

    values, finish, _ = counter.pending(second, combine)
    assert finish(values.cpu().numpy()).tolist() == pytest.approx(rows, rel=1e-15)
    assert len(shards) == 1 and shards[0].sum().item() == sum(int((torch.as_tensor(o) > 0).sum()) for o in (
        c for output in second for c in (output if isinstance(output, tuple) else (output,))))


def layers(count: int) -> list[torch.Tensor]:
    return [relu(64, 16 + 8 * (i % 2), seed=i) for i in range(count)]


@pytest.mark.usefixtures("device_path")
@pytest.mark.parametrize("count", [6, 50])
def test_activations_take_two_launches_a_step_whatever_the_layers_and_copy_nothing(monkeypatch, count):
    outputs = layers(count)
    counter = stats.ActivationStats([o.shape for o in outputs])
    fired = None
    for step in range(3):
        if step == 1:  # the plan made and the kernels built at the first step
            plan = counter._device_last[1]
            monkeypatch.setattr(plan, "_count", Launches())
            monkeypatch.setattr(plan, "_finish", Launches())
            Launches.count = 0
        with TorchOps() as ops:
            values, finish, fired = counter.pending(outputs, fired=fired, checked=True)
        if step == 0:
            continue
        # One count launch (one dtype, one layout) and one finishing launch, for 6 layers or 50.
        assert Launches.count == 2 * step
        # Made: the step's mask of fired units (a byte a unit), and views of buffers; no output
        # copied, nothing computed by torch, nothing read back.
        assert ops.bytes == counter.unit_total
        views = {"aten.view.dtype", "aten.detach.default", "aten.select.int", "aten.slice.Tensor"}
        assert [name for name in ops.names if name not in views] == ["aten.empty.memory_format"]
        assert len(ops.names) <= 8


def test_activation_kernels_that_fail_to_launch_fall_back_to_torch_operations(monkeypatch, caplog):
    # The count kernel cannot be built (a compiler error): one warning, the same numbers from
    # torch operations, which count from then on.
    monkeypatch.setattr(stats, "HOST_KERNELS", False)
    monkeypatch.setattr(stats, "DEVICE_KERNELS_ON_CPU", True)
    monkeypatch.setattr(stats, "_gpu", None)

    def broken(self, *args, **kwargs):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(gpu.UnitCounts, "__call__", broken)
    outputs = [relu(30, 8, dead=(2,)), (relu(4, 3, 5, 5, seed=1), relu(2, 3, 5, 5, seed=2))]
    counter = stats.ActivationStats([stats.unit_shape(o) for o in outputs])
    with caplog.at_level("WARNING"):
        rows, fired = counter(outputs)
        again, _ = counter(outputs)
    assert [r.getMessage() for r in caplog.records if "Triton kernels unavailable" in r.getMessage()] == [
        "gradient statistics: Triton kernels unavailable (RuntimeError: PassManager::run failed); "
        "using torch operations"]
    expected, expected_fired = reference_activations(outputs)
    assert rows.reshape(-1).tolist() == again.reshape(-1).tolist() == pytest.approx(expected, rel=1e-12)
    assert fired.tolist() == expected_fired


@pytest.mark.usefixtures("device_path")
def test_outputs_of_other_units_than_the_layers_never_reach_the_kernels():
    # The kernels add each call's counts at its layer's units: an output wider than its layer
    # would add into the next layer's (or past the end). Such outputs go to torch operations,
    # which refuse them; a mask of the wrong size is refused too.
    counter = stats.ActivationStats([(4, 3), (4, 3)])
    with pytest.raises(RuntimeError):
        counter.pending([relu(4, 5), relu(4, 3)])
    assert counter._device_last[1] is None
    values, finish, fired = counter.pending([relu(4, 3), relu(4, 3, seed=1)])
    assert isinstance(counter._device_last[1], gpu.UnitCounts) and fired.shape == (6,)
    with pytest.raises(ValueError, match="fired: 7 units, this layer set has 6"):
        counter.pending([relu(4, 3), relu(4, 3)], fired=torch.zeros(7, dtype=torch.bool))
