"""Findings: what happened to a run, in words, read from its recorded curves (docs/findings.md).

Pure functions over the long DataFrame `read_metrics(run_dir)` returns (`step`, `tag`, `value`), so
the run's end and `scripts/summarize.py` call the same `diagnose` and always agree.

    >>> metrics = pd.DataFrame({"step": [0, 1, 2, 3], "tag": "train/loss", "value": [4.0, 1e-2, 1e-4, 2e-4]})
    >>> [f.code for f in diagnose(metrics, Thresholds(converge_below=1e-3))]
    ['converged']
    >>> verdict(diagnose(metrics, Thresholds(converge_below=1e-5)))
    'learning'
"""

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

from gradwatch.config.cli import CONF_DIR
from gradwatch.storage.files import read_yaml
from gradwatch.storage.paths import RunPaths
from gradwatch.summary.numbers import format_number, is_finite
from gradwatch.summary.outcome import converge_threshold, end_window, loss_at_end, steps_to_converge
from gradwatch.telemetry import tags

# The verdict is the first of these a run has. Every run with two logged losses has one: when
# nothing else holds the loss either improved (`learning`) or did not (`stalled`). A run with
# fewer has NO_VERDICT.
VERDICT_ORDER = ("diverged", "dead_layer", "vanishing_gradients", "exploding_gradients", "dying_relu",
                 "converged", "stalled", "learning")
NO_VERDICT = "too_short"

# What each verdict means, said where a run has no evidence for it (too few steps, a record
# without its findings); otherwise the finding's own detail says it with numbers.
VERDICT_WORDS = {
    "diverged": "a loss or gradient went non-finite",
    "dead_layer": "every unit of a ReLU layer outputs 0, so nothing below it learns",
    "vanishing_gradients": "the first layer's gradient is tiny next to the last layer's",
    "exploding_gradients": "the gradient norm grew far past its start",
    "dying_relu": "a ReLU layer lost a large share of its units",
    "converged": "the loss ended at or below the convergence threshold",
    "stalled": "the loss stopped improving",
    "learning": "the loss fell but has not reached the convergence threshold",
    NO_VERDICT: "too few steps logged to judge",
}

# Findings whose `where` is a ReLU layer: "Also found" names their layers.
_LAYER_CODES = ("dead_layer", "dying_relu")

# A layer counts as dead on a step when its dead fraction is 1 up to float rounding.
_ALL = 1.0 - 1e-9


@dataclass(frozen=True)
class Finding:
    """One thing that happened: `code` (see VERDICT_ORDER), the `step` it began, `where` (a
    parameter, a layer, or `loss`), and a one-line `detail` with the evidence."""

    code: str
    step: int | None
    where: str
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


def _configured_defaults() -> dict:
    """The `diagnosis:` and `summary:` keys of conf/train.yaml: the one home of the defaults."""
    config = read_yaml(CONF_DIR / "train.yaml")
    return {**config["summary"], **config["diagnosis"]}


_DEFAULTS = _configured_defaults()


@dataclass(frozen=True)
class Thresholds:
    """The `diagnosis.*` thresholds (docs/findings.md) and the convergence
    threshold `summary.converge_below` / `summary.converge_relative`; defaults from conf/train.yaml."""

    dying_rise: float = _DEFAULTS["dying_rise"]
    vanishing_ratio: float = _DEFAULTS["vanishing_ratio"]
    exploding_factor: float = _DEFAULTS["exploding_factor"]
    stall_improvement: float = _DEFAULTS["stall_improvement"]
    converge_below: float = _DEFAULTS["converge_below"]
    converge_relative: bool = _DEFAULTS["converge_relative"]

    @classmethod
    def from_config(cls, config: Mapping | None) -> "Thresholds":
        """From a run's config (a DictConfig or a dict with `diagnosis` and `summary`); a key it
        lacks (an older run) keeps its default."""
        config = config or {}
        given = {**(config.get("summary") or {}), **(config.get("diagnosis") or {})}
        values = {f.name: given[f.name] for f in fields(cls) if given.get(f.name) is not None}
        return cls(**{k: bool(v) if k == "converge_relative" else float(v) for k, v in values.items()})

    @classmethod
    def of_run(cls, run_dir: Path) -> "Thresholds":
        """From `<run_dir>/.hydra/config.yaml`; the defaults where it is missing or unreadable."""
        config = read_yaml(RunPaths(run_dir).config)
        return cls.from_config(config if isinstance(config, dict) else None)


def diagnosis_tag(tag: str) -> bool:
    """The tags `diagnose` and the report read: pass as `read_metrics(run_dir, keep=diagnosis_tag)`."""
    return (tag in (tags.LOSS, tags.GLOBAL_NORM) or tags.is_dead_fraction(tag)
            or tags.is_grad_stat(tag, "norm") or tags.is_grad_stat(tag, "nonfinite"))


class Curves:
    """Every tag's curve of a long metrics frame, sorted by step once (a step logged twice keeps
    its last value); `names` in first-appearance order, which is the network's order."""

    def __init__(self, metrics: pd.DataFrame):
        codes, names = pd.factorize(metrics["tag"], sort=False)
        steps = metrics["step"].to_numpy(dtype=np.int64)
        values = metrics["value"].to_numpy(dtype=np.float64)
        order = np.lexsort((steps, codes))  # stable: equal (tag, step) rows keep their write order
        codes, steps, values = codes[order], steps[order], values[order]
        last = np.ones(len(codes), dtype=bool)
        last[:-1] = (codes[1:] != codes[:-1]) | (steps[1:] != steps[:-1])
        self.codes, self.steps, self.values = codes[last], steps[last], values[last]
        self.names = [str(n) for n in names]
        self._index = {name: i for i, name in enumerate(self.names)}
        self._bounds = np.searchsorted(self.codes, np.arange(len(self.names) + 1))

    def __contains__(self, tag: str) -> bool:
        return tag in self._index

    def get(self, tag: str, before: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of `tag` (empty if absent), only steps < `before` when given."""
        i = self._index.get(tag)
        if i is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        lo, hi = self._bounds[i], self._bounds[i + 1]
        steps, values = self.steps[lo:hi], self.values[lo:hi]
        if before is not None:
            keep = steps < before
            steps, values = steps[keep], values[keep]
        return steps, values

    def params(self) -> list[str]:
        """Parameters with a gradient norm curve, in network order: `['0.weight', '0.bias', ...]`."""
        return [tags.layer_of(n) for n in self.names if tags.is_grad_stat(n, "norm")]

    def layers(self) -> list[str]:
        """ReLU layers with a dead-fraction curve, in network order."""
        return [tags.layer_of(n) for n in self.names if tags.is_dead_fraction(n)]


def diagnose(metrics: pd.DataFrame, thresholds: Thresholds | None = None,
             units: Mapping[str, int] | None = None) -> list[Finding]:
    """The findings of one run, in verdict order (per layer in network order within a code).

    `units` (layer -> unit count), when the caller knows it, turns fractions into counts in the
    details (`16 of 16 units dead`); the curves alone only hold fractions.
    """
    limits = thresholds or Thresholds()
    curves = metrics if isinstance(metrics, Curves) else Curves(metrics)
    found = _diverged(curves)
    # After the first non-finite step every later number is an artefact of it (a NaN activation
    # counts as a dead unit), so the other findings read only the steps before it.
    end = found[0].step if found else None
    dead = _dead_layers(curves, end, units or {})
    found += dead
    # A dead layer zeroes every gradient below it: that is the dead layer, not vanishing gradients.
    alive_until = min([f.step for f in dead], default=end)
    found += _vanishing(curves, alive_until, limits.vanishing_ratio)
    found += _exploding(curves, end, limits.exploding_factor)
    found += _dying(curves, end, limits.dying_rise, {f.where for f in dead})
    if end is None:
        converged = _converged(curves, limits)
        found += converged or _stalled(curves, limits.stall_improvement)
        if not found:
            found += _learning(curves, limits)
    return found


def divergence(metrics: "pd.DataFrame | Curves") -> Finding | None:
    """The `diverged` finding alone (the report marks where runs went non-finite), or None."""
    found = _diverged(metrics if isinstance(metrics, Curves) else Curves(metrics))
    return found[0] if found else None


def verdict(findings: Sequence[Finding]) -> str:
    """The first code of VERDICT_ORDER among the findings, or NO_VERDICT."""
    present = {f.code for f in findings}
    return next((code for code in VERDICT_ORDER if code in present), NO_VERDICT)


def codes(findings: Sequence[Finding]) -> str:
    """The summary's `findings` column: the codes in order, each once, joined by `,`."""
    return ",".join(dict.fromkeys(f.code for f in findings))


def in_words(record: Mapping) -> str:
    """What a run did, in one line, from its run.json fields: the verdict and its evidence, the other
    findings, then the final loss, the accuracy (classification) and the dead ReLU units (when any).

    >>> in_words({"verdict": "stalled", "steps": 200, "final_loss": 0.69, "accuracy_final": None,
    ...           "findings": [{"code": "stalled", "detail": "flat"}],
    ...           "dead_fraction_final": 0.28, "dead_fraction_layers": {"1": 0.19, "3": 0.375}})
    'stalled after 200 steps: flat. Final loss 0.69, 28% of ReLU units dead, worst layer 3 at 38%.'
    """
    name = record.get("verdict") or NO_VERDICT
    steps = record.get("steps") or 0
    facts = [f"Final loss {format_number(record.get('final_loss'))}"]
    if is_finite(record.get("accuracy_final")):
        facts.append(f"accuracy {record['accuracy_final']:.1%}")
    dead, layers = record.get("dead_fraction_final"), record.get("dead_fraction_layers") or {}
    if is_finite(dead) and dead > 0:
        known = {k: v for k, v in layers.items() if is_finite(v)}
        worst = max(known, key=known.get, default=None)
        # One layer, or every layer alike: there is no worst one to name.
        which = (f", worst layer {worst} at {known[worst]:.0%}"
                 if len(layers) > 1 and worst is not None and min(known.values()) < known[worst] else "")
        facts.append(f"{dead:.0%} of ReLU units dead{which}")
    return f"{name} after {steps} step{'' if steps == 1 else 's'}: {evidence(name, record.get('findings'))} " \
           f"{', '.join(facts)}."


def evidence(name: str, findings: Sequence[Finding | Mapping] | None) -> str:
    """The evidence for verdict `name` (its first finding's detail, else what the verdict means), then
    the codes of the other findings, as sentences: what the console line and summary.md say after it.

    >>> evidence("diverged", [Finding("diverged", 12, "loss", "loss went non-finite at step 12"),
    ...                       Finding("exploding_gradients", 6, "0.weight", "..."),
    ...                       Finding("dying_relu", 3, "1", "..."), Finding("dying_relu", 5, "3", "...")])
    'loss went non-finite at step 12. Also found: exploding_gradients; dying_relu in layers 1 and 3.'
    """
    found = [f.as_dict() if isinstance(f, Finding) else f for f in findings or [] if isinstance(f, Finding | Mapping)]
    first = next((f for f in found if f.get("code") == name and f.get("detail")), None)
    text = f"{first['detail'] if first else VERDICT_WORDS.get(name, name)}."
    others: dict[str, list[str]] = {}
    for f in found:
        if f is not first and f.get("code"):
            others.setdefault(str(f["code"]), []).append(str(f.get("where")))
    named = [f"{code} in {_layers(wheres)}" if code in _LAYER_CODES else code for code, wheres in others.items()]
    return f"{text} Also found: {'; '.join(named)}." if named else text


def _layers(names: Sequence[str]) -> str:
    """`layer 1`, `layers 1 and 3`, `layers 1, 3 and 9`."""
    names = list(dict.fromkeys(names))
    if len(names) == 1:
        return f"layer {names[0]}"
    return f"layers {', '.join(names[:-1])} and {names[-1]}"


def as_markdown(findings: Sequence[Finding]) -> str:
    """The findings as Markdown lines (TensorBoard's text plugin renders them): the verdict, then
    each finding's code and detail (the detail names its step and where it happened)."""
    if not findings:
        return f"**verdict: {NO_VERDICT}**: {VERDICT_WORDS[NO_VERDICT]}"
    lines = [f"**verdict: {verdict(findings)}**", ""]
    lines += [f"- `{f.code}`: {f.detail}" for f in findings]
    return "\n".join(lines)


def diagnose_run(run_dir: Path, thresholds: Thresholds | None = None,
                 metrics: pd.DataFrame | None = None) -> list[Finding]:
    """`diagnose` for a run folder: its metrics (unless given) and its own thresholds (unless given)."""
    from gradwatch.storage.parquet import read_metrics

    if metrics is None:
        metrics = read_metrics(run_dir, keep=diagnosis_tag)
    return diagnose(metrics, thresholds or Thresholds.of_run(run_dir))


# --- one function per code ---------------------------------------------------------------------

def _g(value: float) -> str:
    """A number in a detail: 3 significant digits, `nan` when not finite (numbers.py's one spelling)."""
    return format_number(value, ".3g")


def _diverged(curves: Curves) -> list[Finding]:
    """The first step with a non-finite loss, gradient statistic or activation statistic, or a
    parameter counting non-finite gradient values; `where` prefers the first parameter in network
    order, then a layer, then the global norm, then the loss."""
    kinds = np.zeros(len(curves.names), dtype=np.int8)  # 0: not read here
    rank = np.full(len(curves.names), len(curves.names), dtype=np.int64)
    for i, name in enumerate(curves.names):
        if name == tags.LOSS:
            kinds[i], rank[i] = 4, 0
        elif name == tags.GLOBAL_NORM:
            kinds[i], rank[i] = 3, 0
        elif name.startswith("grad/"):
            kinds[i], rank[i] = 1, i
        elif name.startswith("act/"):
            kinds[i], rank[i] = 2, i
    counts_nonfinite = np.array([tags.is_grad_stat(n, "nonfinite") for n in curves.names],
                                dtype=bool)
    read = kinds[curves.codes] > 0
    bad = read & (~np.isfinite(curves.values) | (counts_nonfinite[curves.codes] & (curves.values > 0)))
    if not bad.any():
        return []
    step = int(curves.steps[bad].min())
    at_step = np.unique(curves.codes[bad & (curves.steps == step)])
    first = min(at_step, key=lambda c: (kinds[c], rank[c]))
    name = curves.names[first]
    loss_steps, loss = curves.get(tags.LOSS)
    loss_text = ""
    if len(loss_steps) and step in loss_steps:
        loss_text = f" with loss {_g(float(loss[np.searchsorted(loss_steps, step)]))}"
    if kinds[first] == 4:
        where = "loss"
        finite = np.isfinite(loss) & (loss_steps < step)
        before = (f", last finite {_g(float(loss[finite][-1]))} at step {int(loss_steps[finite][-1])}"
                  if finite.any() else "")
        detail = f"loss went non-finite at step {step}{before}"
    elif kinds[first] == 3:
        where = "global_norm"
        detail = f"global gradient norm went non-finite at step {step}{loss_text}"
    else:
        where = tags.layer_of(name)
        what = "gradient of" if kinds[first] == 1 else "activations of layer"
        count = ""
        nonfinite = tags.grad(where, "nonfinite")
        if kinds[first] == 1 and nonfinite in curves:
            steps, values = curves.get(nonfinite)
            hit = values[steps == step]
            if len(hit) and hit[0] > 0:
                count = f" ({int(hit[0])} value{'' if int(hit[0]) == 1 else 's'})"
        detail = f"{what} {where} went non-finite at step {step}{count}{loss_text}"
    return [Finding("diverged", step, where, detail)]


def _dead_layers(curves: Curves, end: int | None, units: Mapping[str, int]) -> list[Finding]:
    """ReLU layers whose every unit was dead on every logged step from some step to the end."""
    found = []
    for layer in curves.layers():
        steps, dead = curves.get(tags.act(layer, "dead_fraction"), before=end)
        if not len(dead) or dead[-1] < _ALL:
            continue
        alive = np.flatnonzero(dead < _ALL)
        start = alive[-1] + 1 if len(alive) else 0
        since = int(steps[start])
        n = units.get(layer)
        what = "the only unit" if n == 1 else f"all {n} units" if n else "all units"
        detail = f"{what} of layer {layer} dead from step {since} to the end"
        if since != int(steps[0]):
            detail += f", {_pct(float(dead[0]))} dead at step {int(steps[0])}"
        found.append(Finding("dead_layer", since, layer, detail))
    return found


def _dying(curves: Curves, end: int | None, rise: float, dead_layers: set[str]) -> list[Finding]:
    """Layers whose dead fraction at the end (median over the last tenth of the logged steps)
    is at least `rise` above its first logged value; a layer already found dead is not repeated."""
    found = []
    for layer in curves.layers():
        if layer in dead_layers:
            continue
        steps, dead = curves.get(tags.act(layer, "dead_fraction"), before=end)
        if len(dead) < 2:
            continue
        final = float(np.median(dead[-end_window(len(dead)):]))
        if final - dead[0] < rise:
            continue
        since = int(steps[np.argmax(dead - dead[0] >= rise)]) if (dead - dead[0] >= rise).any() else int(steps[-1])
        detail = (f"dead units in layer {layer} rose from {_pct(float(dead[0]))} at step {int(steps[0])} to "
                  f"{_pct(final)} ({_end(steps)}); the rise reached {_points(rise)} at step {since}")
        found.append(Finding("dying_relu", since, layer, detail))
    return found


def _weights(curves: Curves) -> list[str]:
    return [p for p in curves.params() if p.endswith("weight")]


def _vanishing(curves: Curves, end: int | None, ratio: float) -> list[Finding]:
    """The first layer's weight gradient norm against the last layer's, step by step; judged on
    the median ratio over the run's logged steps (those where the last layer has a gradient)."""
    weights = _weights(curves)
    if len(weights) < 2:
        return []
    first, last = weights[0], weights[-1]
    s1, n1 = curves.get(tags.grad(first, "norm"), before=end)
    s2, n2 = curves.get(tags.grad(last, "norm"), before=end)
    steps, i1, i2 = np.intersect1d(s1, s2, assume_unique=True, return_indices=True)
    n1, n2 = n1[i1], n2[i2]
    usable = np.isfinite(n1) & np.isfinite(n2) & (n2 > 0)
    if not usable.any():
        return []
    ratios, steps = n1[usable] / n2[usable], steps[usable]
    median = float(np.median(ratios))
    if median >= ratio:
        return []
    since = int(steps[np.argmax(ratios < ratio)])
    detail = (f"gradient norm of {first} is {median:.2g} x that of {last} (median of {len(ratios)} steps); "
              f"the ratio is under {ratio:g} from step {since}")
    return [Finding("vanishing_gradients", since, first, detail)]


def _exploding(curves: Curves, end: int | None, factor: float) -> list[Finding]:
    """The first step the global gradient norm exceeds `factor` x its first positive value;
    `where` is the parameter with the largest gradient norm on that step."""
    steps, norm = curves.get(tags.GLOBAL_NORM, before=end)
    positive = np.flatnonzero(np.isfinite(norm) & (norm > 0))
    if not len(positive):
        return []
    base_at, base = int(steps[positive[0]]), float(norm[positive[0]])
    over = np.flatnonzero(norm > factor * base)
    if not len(over):
        return []
    step, value = int(steps[over[0]]), float(norm[over[0]])
    where, largest = "global_norm", -np.inf
    for param in curves.params():
        s, v = curves.get(tags.grad(param, "norm"))
        hit = v[s == step]
        if len(hit) and hit[0] > largest:
            where, largest = param, float(hit[0])
    detail = (f"global gradient norm reached {_g(value)} at step {step}, {value / base:.3g} x its step-{base_at} "
              f"value of {_g(base)}" + (f"; largest in {where}" if where != "global_norm" else ""))
    return [Finding("exploding_gradients", step, where, detail)]


def _threshold(loss: np.ndarray, limits: Thresholds) -> tuple[float, str]:
    """The convergence threshold of this curve, and how it was set (for a relative one)."""
    threshold = converge_threshold(float(loss[0]), limits.converge_below, limits.converge_relative)
    return threshold, f" = {limits.converge_below:g} x the step-0 loss" if limits.converge_relative else ""


def _end(steps: np.ndarray) -> str:
    """How "the end" of a curve was read: the median of its last logged steps (`end_window`)."""
    n = end_window(len(steps))
    return f"median of the last {n} logged steps" if n > 1 else f"at step {int(steps[-1])}"


def _pct(fraction: float) -> str:
    return f"{fraction:.0%}"


def _share(fraction: float) -> str:
    """A share to one decimal, with more where that would round a share below 1 up to 100.0%.

    >>> _share(0.8994), _share(0.99954), _share(1.0)
    ('89.9%', '99.95%', '100.0%')
    """
    for digits in range(1, 6):
        text = f"{fraction:.{digits}%}"
        if fraction >= 1 or not text.startswith("100."):
            break
    return text


def _points(rise: float) -> str:
    """A rise of a fraction, in percentage points: `25 points`."""
    return f"{100 * rise:.3g} points"


def _converged(curves: Curves, limits: Thresholds) -> list[Finding]:
    """The loss ended at or below the threshold (`outcome.ended_below`); step = the first step it got there."""
    steps, loss = curves.get(tags.LOSS)
    step = steps_to_converge(steps, loss, limits.converge_below, limits.converge_relative)
    if step is None:
        return []
    threshold, relative = _threshold(loss, limits)
    at_end = loss_at_end(loss)
    if not at_end <= threshold:
        return []
    first = float(loss[np.searchsorted(steps, step)])
    detail = (f"loss ended at {_g(at_end)} ({_end(steps)}), at or below {_g(threshold)}{relative}; "
              f"first there at step {step} with {_g(first)}")
    return [Finding("converged", step, "loss", detail)]


def _learning(curves: Curves, limits: Thresholds) -> list[Finding]:
    """Nothing else held and the loss ended lower than it started: the run is learning."""
    steps, loss = curves.get(tags.LOSS)
    if len(loss) < 2:
        return []
    at_end = loss_at_end(loss)
    threshold, relative = _threshold(loss, limits)
    reached = steps_to_converge(steps, loss, limits.converge_below, limits.converge_relative)
    where = (f"it was at or below {_g(threshold)}{relative} at step {reached} but did not stay there"
             if reached is not None else f"not yet at or below {_g(threshold)}{relative}")
    detail = (f"loss fell {_share(1 - at_end / float(loss[0]))} from {_g(float(loss[0]))} at step {int(steps[0])} "
              f"to {_g(at_end)} ({_end(steps)}); {where}")
    return [Finding("learning", int(steps[-1]), "loss", detail)]


def _stalled(curves: Curves, improvement: float) -> list[Finding]:
    """Loss at the middle of the run against the end (medians over a tenth of the logged steps
    each, so minibatch noise does not decide): relative improvement under `improvement`; or a
    loss that ended no lower than it started, however it moved in between."""
    steps, loss = curves.get(tags.LOSS)
    if len(loss) < 2:
        return []
    w = end_window(len(loss))
    middle = int(np.searchsorted(steps, steps[0] + (steps[-1] - steps[0]) / 2))
    at_middle = float(np.median(loss[max(0, middle - w + 1):middle + 1]))
    at_end = float(np.median(loss[-w:]))
    if not at_end < float(loss[0]):
        detail = (f"loss ended at {_g(at_end)} ({_end(steps)}), no lower than {_g(float(loss[0]))} "
                  f"at step {int(steps[0])}")
        return [Finding("stalled", int(steps[0]), "loss", detail)]
    if not at_middle > 0:
        return []
    gained = (at_middle - at_end) / at_middle
    if gained >= improvement:
        return []
    change = f"improved only {gained:.1%}" if gained >= 0 else f"rose {-gained:.1%}"
    detail = (f"loss {change} over the last half, less than {improvement:.0%}: {_g(at_middle)} at step "
              f"{int(steps[middle])}, {_g(at_end)} at step {int(steps[-1])} (medians of {w} logged steps)")
    return [Finding("stalled", int(steps[middle]), "loss", detail)]


# --- a sweep in words (summary.md) ----------------------------------------------------------------

# What the "what happened" section names, most serious first: (codes, what it is called).
HAPPENINGS = ((("diverged",), "runs diverged"), (("dead_layer", "dying_relu"), "ReLUs died"),
              (("vanishing_gradients",), "gradients vanished"), (("exploding_gradients",), "gradients exploded"),
              (("stalled",), "the loss stalled"))


def what_happened(runs: pd.DataFrame, swept: Sequence[str], most: int = 8) -> list[str]:
    """Markdown lines naming the settings where runs diverged, ReLUs died, gradients vanished or
    exploded, or the loss stalled, from the runs table's `findings` column (codes joined by `,`).

    Each line counts the runs per setting (`3/3` = every seed), names at most `most` settings,
    and says which swept values all those settings share (`all with optimizer.lr=0.2`).
    """
    if not len(runs) or "findings" not in runs:
        return []
    keys = [k for k in swept if k in runs.columns]
    setting = (runs[keys].astype(str).apply(lambda r: ", ".join(f"{k}={v}" for k, v in r.items()), axis=1)
               if keys else pd.Series("all runs", index=runs.index))
    codes_of = runs["findings"].fillna("").astype(str).str.split(",")
    total = setting.value_counts()
    lines, nowhere = [], []
    for wanted, name in HAPPENINGS:
        hit = codes_of.map(lambda found, wanted=wanted: any(c in found for c in wanted)).astype(bool)
        if not hit.any():
            nowhere.append(name)
            continue
        counts = setting[hit].value_counts()
        order = sorted(counts.index, key=lambda s: (-counts[s] / total[s], list(setting).index(s)))
        named = [f"{s} ({counts[s]}/{total[s]})" for s in order[:most]]
        more = f", and {len(order) - most} more" if len(order) > most else ""
        shared = _shared_values(runs.loc[hit, keys], runs[keys]) if keys and len(counts) > 1 else ""
        if more:  # too many to name: the swept key that tells them apart best
            more += _by_key(runs[keys], hit)
        lines.append(f"- **{name[0].upper() + name[1:]}** in {len(counts)} of {len(total)} settings "
                     f"({int(hit.sum())} of {len(runs)} runs){shared}: {'; '.join(named)}{more}.")
    if nowhere:
        lines.append(f"- Nowhere: {', '.join(nowhere)}.")
    return lines


def _shared_values(flagged: pd.DataFrame, every: pd.DataFrame) -> str:
    """`, all with k=v` for the swept keys on which every flagged run agrees (and the sweep does not)."""
    common = [f"{k}={flagged[k].astype(str).iloc[0]}" for k in flagged.columns
              if flagged[k].astype(str).nunique() == 1 and every[k].astype(str).nunique() > 1]
    return f", all with {', '.join(common)}" if common else ""


def _by_key(values: pd.DataFrame, hit: pd.Series) -> str:
    """`; by model.bias_init: -3.0 40/40, ...`: the runs hit per value of the key whose share
    of hit runs varies most between its values."""
    best, spread = "", 0.0
    for key in values.columns:
        groups = hit.groupby(values[key].astype(str), sort=False)
        share = groups.mean()
        if share.max() - share.min() > spread:
            spread = share.max() - share.min()
            counts = groups.agg(["sum", "size"]).sort_values("sum", ascending=False)
            best = f"; by {key}: " + ", ".join(f"{v} {int(r['sum'])}/{int(r['size'])}" for v, r in counts.iterrows())
    return best
