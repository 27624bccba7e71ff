"""scripts/bench_gpu.py's dry run without CUDA: the script works, the GPU path's CPU proxy
holds one copy of the weights where the torch operations held ~70 bytes a parameter, and the
callback's launches a step do not grow with the layers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script measures for minutes")
def test_bench_gpu_dry_run_without_cuda(tmp_path):
    pytest.importorskip("triton", reason="the proxy runs the GPU kernels in triton's interpreter")
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_gpu.py"), "--models", "mlp_small,resnet18",
                          "--variants", "off,gradwatch,floor", "--out", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("no CUDA device: a small CPU dry run")
    report = json.loads(out.read_text())
    for model in ("mlp_small", "resnet18"):
        rows = report["summary"][model]
        assert set(rows) == {"off", "gradwatch", "floor"}
        assert rows["off"]["ratio"] == 1.0 and all(len(r["ratios"]) == 2 and r["error"] is None for r in rows.values())
    assert report["summary"]["mlp_small"]["off"]["params"] == 2 * 256 + 256 + 2 * (256 * 256 + 256) + 257
    proxy = report["device_path_proxy"]
    assert proxy["tensors"] == 149
    device, torch_ops = proxy["device kernels"], proxy["torch operations"]
    assert device["later_step_bytes_per_param"] == torch_ops["later_step_bytes_per_param"] == 0
    # One float32 copy of the weights, plus tables and partial sums: O(tensors + chunks).
    assert 4.0 <= device["first_step_bytes_per_param"] <= 4.1 < 60 <= torch_ops["first_step_bytes_per_param"]
    assert device["launches_per_step"] == 4
    # The callback on the GPU path in a fit: a fixed number of launches a step (statistics, update
    # ratio, ReLU counts: 2 each; the first step also builds the other variants), and host time.
    hosted = report["callback_host_proxy"]
    assert 6 <= hosted["mlp_small"]["launches_per_step"] < 6.05
    assert 6 <= hosted["deep_small"]["launches_per_step"] < 6.05  # 50 ReLU layers: still 2 for them
    assert all(row["host_us_per_step"] > 0 for row in hosted.values())
