"""Command line: `tropd train`, `tropd objectives`, `tropd config`, `tropd --version`.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad config, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

import tropd

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tropd", description=tropd.__doc__)
    parser.add_argument("--version", action="version", version=f"tropd {tropd.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="distil a teacher into a student")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="key.sub=value settings, e.g. optim.lr=1e-4")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")

    commands.add_parser("objectives", help="list the methods and their options")
    commands.add_parser("config", help="print every config key, its default and meaning")

    args = parser.parse_args(argv)
    console = Console(stderr=True)
    try:
        if args.command == "train":
            return _train(args, console)
        if args.command == "config":
            _config_reference()
        else:
            _objectives()
        return EXIT_OK
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; resume with --resume[/]")
        return EXIT_INTERRUPTED
    except ValueError as err:  # ConfigError and the one-line errors of loaders
        console.print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)
        return EXIT_USAGE


def _train(args: argparse.Namespace, console: Console) -> int:
    from tropd.config import load_config
    from tropd.train import train

    config = load_config(args.config, args.overrides)
    run_dir = train(config, resume=args.resume)
    console.print(f"[green]done:[/] {run_dir}  (metrics.jsonl, samples.jsonl, final/)")
    return EXIT_OK


def _config_reference() -> None:
    from tropd.config import config_reference

    table = Table(title="tropd config keys (YAML sections, or key.sub=value overrides)")
    for column in ("key", "default", "meaning"):
        table.add_column(column, overflow="fold")
    for row in config_reference():
        table.add_row(*row)
    Console().print(table)


def _objectives() -> None:
    from tropd.objectives import describe_objectives

    table = Table(title="tropd objectives (get_objective(name, **options))")
    for column in ("name", "what it computes", "options (defaults)", "paper"):
        table.add_column(column, overflow="fold")
    for entry in describe_objectives():
        options = ", ".join(f"{k}={v}" for k, v in entry["options"].items())
        name = entry["name"] + (" (+guidance)" if entry["guidance"] else "")
        table.add_row(name, entry["summary"], options, entry["paper"])
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
