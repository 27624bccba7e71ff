"""The sweep report as one PNG: loss curves per setting, and dead fraction against each swept key."""

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _setting_labels(summary) -> pd.Series:
    keys = [k for k in summary.swept if k in summary.runs.columns]
    if not keys:
        return pd.Series("all", index=summary.runs["run_dir"])
    labels = summary.runs[keys].astype(str).apply(lambda r: ",".join(f"{k}={v}" for k, v in r.items()), axis=1)
    return pd.Series(labels.to_numpy(), index=summary.runs["run_dir"])


def render_report(summary) -> bytes:
    """PNG bytes: mean loss curve per setting (log scale), and dead_fraction_final per swept key."""
    keys = [k for k in summary.swept if k in summary.runs.columns] or ["setting"]
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(6 + 4 * len(keys), 4.5), squeeze=False)
    ax = axes[0, 0]
    curves = summary.curves
    if len(curves):
        curves = curves.assign(setting=curves["run_dir"].map(_setting_labels(summary)))
        for setting, frame in curves.groupby("setting"):
            mean = frame.groupby("step")["loss"].mean()
            ax.plot(mean.index, mean.to_numpy(), label=setting, linewidth=1)
        ax.set_yscale("log")
        if curves["setting"].nunique() <= 12:
            ax.legend(fontsize=6)
    ax.set_xlabel("step")
    ax.set_ylabel("train/loss (mean over seeds)")
    ax.set_title("loss curves per setting")
    for ax, key in zip(axes[0, 1:], keys, strict=True):
        runs = summary.runs
        if key in runs.columns and "dead_fraction_final" in runs.columns:
            values = runs[key].astype(str)
            order = sorted(values.unique(), key=lambda v: (_as_number(v), v))
            positions = {v: i for i, v in enumerate(order)}
            ax.scatter(values.map(positions), runs["dead_fraction_final"], alpha=0.7)
            ax.set_xticks(range(len(order)), order, rotation=30, fontsize=7)
        ax.set_xlabel(key)
        ax.set_ylabel("dead_fraction_final")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"dead ReLU fraction vs {key}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _as_number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return np.inf
