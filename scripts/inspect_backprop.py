"""Step through one forward and backward pass: `python scripts/inspect_backprop.py experiment=seed_tiny_relu`.

Any Hydra override of train.py works; the pass runs on the configured model, loss and first batch.
`--format json` prints the same record for machines, `--dot FILE` writes the grad_fn graph,
`--gradcheck` adds a finite-difference check. The exit status is 1 when a check fails.
"""

import argparse
import sys
from pathlib import Path

from hydra.errors import HydraException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException

import gradwatch  # noqa: F401  (registers the config's resolvers)
from gradwatch.config.cli import check_group_choices, compose, unknown_key
from gradwatch.config.errors import ConfigError, first_line


def _one_line(err: Exception) -> str:
    if isinstance(err, ConfigError):
        return str(err)
    if isinstance(err, OverrideParseException):
        return f"cannot parse override '{err.override}': {first_line(err)}"
    return first_line(err)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Other arguments are Hydra overrides, e.g. model.activation=tanh.",
    )
    parser.add_argument("--format", choices=("text", "json"), default="text",
                        help="output format (default text)")
    parser.add_argument("--dot", type=Path, metavar="FILE", help="write the autograd graph as Graphviz DOT")
    parser.add_argument("--gradcheck", action="store_true",
                        help="compare autograd with central finite differences (float64)")
    parser.add_argument("--output", type=Path, metavar="FILE", help="write the report here instead of stdout")
    args, overrides = parser.parse_known_args(argv)

    message = check_group_choices(overrides) or unknown_key(overrides)
    if message:
        print(f"gradwatch: {message}", file=sys.stderr)
        return 2
    try:
        # Imported late: torch and Lightning take seconds to load, and a bad group option
        # should be reported without that wait.
        from gradwatch.config.build import build
        from gradwatch.inspect.inspector import inspect_backprop
        from gradwatch.inspect.rendering import render_dot, render_json, render_text

        parts = build(compose(overrides))
    except (ConfigError, HydraException, OmegaConfBaseException) as err:
        print(f"gradwatch: {_one_line(err)}", file=sys.stderr)
        return 2

    x, y = next(iter(parts.batches))
    record = inspect_backprop(parts.model, parts.loss_fn, x, y, gradcheck=args.gradcheck)
    report = render_json(record) if args.format == "json" else render_text(record)
    try:
        if args.output is None:
            sys.stdout.write(report)
        else:
            args.output.write_text(report)
        if args.dot is not None:
            args.dot.write_text(render_dot(record))
    except OSError as err:
        print(f"gradwatch: cannot write {err.filename}: {err.strerror}", file=sys.stderr)
        return 2
    failed = (record.chain_rule is not None and record.chain_rule.passed is False) or (
        record.gradcheck is not None and not record.gradcheck.passed
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
