"""The `hiera-perception` command line (also `python -m hiera_perception`).

Each command lives in the module that owns its concept; that module defines
`add_arguments(parser)` and `main(args) -> int`. Only the chosen command's module is imported, so
`hiera-perception --help` answers without loading torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from pathlib import Path

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("hiera_perception.demo", "synthetic camera -> perception node -> printed labels, over real ROS 2"),
    "run": ("hiera_perception.video", "labels (and embeddings) per clip of a video file, no ROS needed"),
    "publish": ("hiera_perception.camera", "a video file or webcam as a sensor_msgs/Image camera topic"),
    "synth": ("hiera_perception.synth", "render the synthetic action data set"),
    "pretrain": ("hiera_perception.train", "MAE pre-training on unlabeled clips (data folder or rosbag2)"),
    "finetune": ("hiera_perception.train", "supervised fine-tuning of a classification head (and encoder)"),
    "eval": ("hiera_perception.evaluate", "accuracy, per-class accuracy, confusion matrix, clips/s"),
    "teach": ("hiera_perception.labeler",
              "teach new labels (prototypes) from a data folder or a rosbag2; list or forget them"),
    "adapt": ("hiera_perception.adapt", "unlabeled MAE adaptation of a model to a data folder or rosbag2"),
    "fetch-weights": ("hiera_perception.weights", "download an official Hiera checkpoint (CC BY-NC 4.0, opt-in)"),
    "bench": ("benchmarks", "the benchmarks in benchmarks/ (from a source checkout), results to files"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hiera-perception", description="Hiera video action perception: models, data, ROS 2 node tools."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def _bench(argv: list[str]) -> int:
    """`bench ARGS` is `python -m benchmarks ARGS`; the benchmarks live beside the package in a checkout."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "__main__.py").is_file():
        print("hiera-perception bench: run it from a source checkout (benchmarks/ is not installed)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    return importlib.import_module("benchmarks.__main__").main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((i for i, a in enumerate(argv) if a not in ("-v", "--verbose")), len(argv))
    if argv[first : first + 1] == ["bench"]:  # its own parser: `python -m benchmarks` takes the rest
        return _bench(argv[first + 1 :])
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (`timeout`, systemd, `docker stop`) unwinds like an error, so that temporary files are removed
        # (a download's, a checkpoint's) and `finally` blocks run; by default it killed the process outright.
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        module = importlib.import_module(COMMANDS[args.command][0])  # torch, for most: Ctrl-C may come meanwhile
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `... | head`: the reader left, nothing went wrong here
        sys.stderr.close()
        return 0
    except (ValueError, OSError, ImportError, FloatingPointError) as e:
        # bad input, a missing or unreadable file, a training run that diverged: say it in one line
        if args.verbose:
            raise
        print(f"hiera-perception {args.command}: {e}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
