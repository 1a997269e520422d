"""`python -m benchmarks NAME [options]`: run one benchmark, results to benchmarks/results/."""

import argparse
import importlib
import logging
import sys

BENCHMARKS = {
    "encoder": "encoder forward, ours vs official (latency, throughput)",
    "mae_step": "MAE training step (forward + backward + AdamW), ours vs official",
    "engine": "engine latency, uint8 frames in -> labels out, no ROS, at a live frame rate",
    "node": "node latency over real ROS 2 (demo pipeline), adaptation off and on",
    "adaptation": "accuracy under each synthetic shift before and after MAE adaptation, clean accuracy, drift",
    "report": "render the README table from benchmarks/results/*.json",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if a in BENCHMARKS), None)
    for name, help_text in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(f"benchmarks.{name}").add_arguments(p)
    args = parser.parse_args(argv)
    if args.benchmark is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        importlib.import_module(f"benchmarks.{args.benchmark}").main(args)
    except (ValueError, OSError, ImportError) as e:  # a bad model, config or results file: one line, as the CLI says it
        print(f"python -m benchmarks {args.benchmark}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
