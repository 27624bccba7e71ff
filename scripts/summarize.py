"""(Re)build a sweep's summary: `python scripts/summarize.py outputs/multirun/<date>/<time>`.

Works on any folder of runs, including a sweep still running or interrupted, and on one run's
folder (its findings, and the same report figures for that run alone). `--converge-below` and
`--relative` apply to the findings too (`converged`, `stalled`). Also writes `mean_over_seeds/`
for TensorBoard (`gradwatch.summary.aggregate`) and says which folder to open in it.
"""

import argparse
import sys
from pathlib import Path

from gradwatch.summary.aggregate import write_mean_over_seeds
from gradwatch.summary.findings import what_happened
from gradwatch.summary.sweep import open_line
from gradwatch.summary.table import readable_grouped, write_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a sweep folder, a run folder, or any folder of runs")
    parser.add_argument("--converge-below", type=float, default=None,
                        help="loss threshold for steps_to_converge (default: the runs' own summary.converge_below)")
    parser.add_argument("--relative", action=argparse.BooleanOptionalAction, default=None,
                        help="the threshold is a fraction of each run's step-0 loss (default: as the runs had it)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"folder={args.folder} is not valid: allowed is an existing folder of runs")
    summary = write_summary(args.folder, args.converge_below, args.relative)
    means = write_mean_over_seeds(args.folder, summary)
    print(readable_grouped(summary).to_string(index=False) if len(summary.grouped) else "no runs found")
    for line in what_happened(summary.runs, summary.swept) if len(summary.runs) else []:
        print(line.replace("**", ""))
    print(f"\n{len(summary.runs)} runs; wrote {args.folder}/{', '.join(summary.written)}")
    if means is not None:
        print(f"mean over seeds per setting (TensorBoard): {means}")
    if summary.unreadable:
        print(f"unreadable: {', '.join(summary.unreadable)}")
    print(open_line(args.folder).removeprefix("gradwatch: "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
