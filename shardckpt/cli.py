"""The ``shardckpt`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardckpt", description="Sharded checkpoints for JAX / Flax NNX")
    sub = parser.add_subparsers(dest="command", required=True)
    from . import demo
    demo.add_arguments(sub.add_parser("demo", help="train, save through Ray, get killed, resume bit-exactly"))
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo.run_demo(args.dir, args.steps, args.save_every, args.kill_after, args.backend)
    return 2


if __name__ == "__main__":
    sys.exit(main())
