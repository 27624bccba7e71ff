"""Open TensorBoard on the newest run or sweep: `python scripts/open_tensorboard.py [FOLDER]` (`make tensorboard`).

Without FOLDER, the newest folder under outputs/ (`<date>/<time>` or `multirun/<date>/<time>`).
A sweep with more runs than TensorBoard selects at once opens on its mean over seeds per setting.
`--port` and `--host` go to tensorboard (default: 6006 on 127.0.0.1).
"""

import argparse
import os
import shlex
import sys
from pathlib import Path

from gradwatch.storage.paths import tensorboard_command
from gradwatch.summary.aggregate import logdir_to_open, newest_output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, help="a run or sweep folder (default: the newest in outputs/)")
    parser.add_argument("--outputs", type=Path, default=Path("outputs"), help="where to look for the newest")
    parser.add_argument("--port", type=int, default=6006)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    folder = args.folder or newest_output(args.outputs)
    if folder is None:
        parser.error(f"folder: nothing under {args.outputs} yet; allowed is a run or sweep folder (make train first)")
    if not folder.is_dir():
        parser.error(f"folder={folder} is not valid: allowed is an existing run or sweep folder")
    command = shlex.split(tensorboard_command(logdir_to_open(folder)))
    command += ["--host", args.host, "--port", str(args.port)]
    print(f"gradwatch: {shlex.join(command)}", flush=True)
    os.execvp(command[0], command)  # TensorBoard takes over this process (Ctrl-C ends it)
    return 0


if __name__ == "__main__":
    sys.exit(main())
