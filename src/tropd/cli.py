"""Command line: `tropd train`, `tropd eval`, `tropd prune`, `tropd demo`, `tropd plot`,
`tropd models`, `tropd objectives`, `tropd config`, `tropd --version`.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad config, 75 (EX_TEMPFAIL)
`tropd train` stopped by SIGTERM or SIGINT after the step in progress and its checkpoint
(`--resume` continues), 130 interrupted at once (a second Ctrl-C; the last checkpoint holds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from transformers.utils import logging as hf_logging

import tropd

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_STOPPED, EXIT_INTERRUPTED = 0, 1, 2, 75, 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tropd", description=tropd.__doc__)
    parser.add_argument("--version", action="version", version=f"tropd {tropd.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="distil a teacher into a student",
        usage="tropd train CONFIG [key.sub=value ...] [--resume] [--nproc N] (any order)",
    )
    train.add_argument(
        "arguments",
        nargs="+",
        metavar="CONFIG | key.sub=value",
        help="the YAML config file and key.sub=value settings (e.g. optim.lr=1e-4), any order",
    )
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.add_argument(
        "--nproc", type=int, default=1, help="processes on this machine (runs torchrun for you)"
    )

    ev = commands.add_parser("eval", help="sample a model on a task and score it (pass@k)")
    ev.add_argument("model", help="HF id or dir, gguf:PATH, a run directory or a checkpoint")
    ev.add_argument("--task", help="task name (default: the run's task, else required)")
    ev.add_argument("--options", default=None, help="task options as YAML, e.g. '{digits: 2}'")
    ev.add_argument("--system-prompt", default=None, help="system message before each prompt")
    ev.add_argument("--samples", type=int, default=1, help="responses per item (n)")
    ev.add_argument("--k", default="1", help="pass@k values, comma-separated (k <= samples)")
    ev.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ev.add_argument("--top-p", type=float, default=1.0)
    ev.add_argument("--max-new-tokens", type=int, default=256)
    ev.add_argument("--num-items", type=int, default=100, help="eval-split items")
    ev.add_argument("--batch-size", type=int, default=16, help="sequences per generate call")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--dtype", default="auto")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--out", default=None, help="folder for results.jsonl and summary.json")

    prune = commands.add_parser("prune", help="save a student made of some teacher layers")
    prune.add_argument("teacher", help="any model name tropd loads (HF id, dir, gguf:PATH)")
    prune.add_argument("--layers", required=True, help="layers to keep, e.g. 0,2,4 or 0-7")
    prune.add_argument("--out", required=True, help="output directory (HF format)")
    prune.add_argument("--dtype", default="float32", help="dtype of the saved student")

    serve = commands.add_parser("serve-teacher", help="serve a teacher's scores over HTTP")
    serve.add_argument("model", help="any model name tropd loads (HF id, dir, builtin:...)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token", default=None, help=argparse.SUPPRESS)  # refused: see below
    serve.add_argument(
        "--token-file", default=None, help="file holding the bearer token (or $TROPD_TEACHER_TOKEN)"
    )
    serve.add_argument("--dtype", default="auto")
    serve.add_argument("--device", default="auto")
    serve.add_argument("--max-top-k", type=_positive, default=1024, help="largest top_k served")
    serve.add_argument("--max-body-mb", type=float, default=64, help="largest request body")
    serve.add_argument(
        "--chunk-tokens",
        type=_positive,
        default=1 << 15,
        help="padded tokens in one forward pass (rows x longest row), taken from the waiting "
        "requests in turn; also the longest sequence served (default 32768)",
    )
    serve.add_argument(
        "--max-request-tokens",
        type=_positive,
        default=1 << 18,
        help="tokens in one request, prompts plus new tokens (default 262144)",
    )
    serve.add_argument(
        "--max-new-tokens", type=_positive, default=4096, help="new tokens per generated prompt"
    )
    serve.add_argument(
        "--max-answer-mb", type=float, default=512, help="largest scoring answer (top-k and all)"
    )

    demo = commands.add_parser(
        "demo", help="the paper's experiment at CPU scale: OPD vs TrOPD, control and mismatch"
    )
    demo.add_argument("--quick", action="store_true", help="a short budget (about two minutes)")
    demo.add_argument(
        "--cells", default="none,strong", help="comma-separated: none, mild, strong, multi"
    )
    demo.add_argument(
        "--methods", default="opd,fkl_outlier,tropd", help="comma-separated objectives"
    )
    demo.add_argument("--steps", type=int, default=None, help="override the step budget")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default=None, help="output folder (default runs/demo-<time>)")
    demo.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest here)")

    plot = commands.add_parser("plot", help="plot the training curves of runs, overlaid")
    plot.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl)")
    plot.add_argument("--out", required=True, help="folder for the PNGs")
    plot.add_argument("--title", default=None)

    models = commands.add_parser("models", help="list or rebuild the shipped built-in models")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    models_list = models_commands.add_parser(
        "list", help="name, recipe key, accuracy, size, shipped/cached"
    )
    models_list.add_argument("--json", action="store_true", help="print JSON instead")
    models_build = models_commands.add_parser(
        "build", help="rebuild models with their recipes (default: all, into the package)"
    )
    models_build.add_argument("names", nargs="*", help="models to build (tropd models list)")
    models_build.add_argument(
        "--force", action="store_true", help="rebuild even if built with today's recipe"
    )
    models_build.add_argument(
        "--out", default=None, help="folder to build into (default: the package's shipped/)"
    )

    commands.add_parser("objectives", help="list the methods and their options")
    commands.add_parser("config", help="print every config key, its default and meaning")

    args, unknown = parser.parse_known_args(argv)
    if args.command == "train":  # `train cfg.yaml --nproc 2 key=value`: the rest comes last
        args.arguments += [a for a in unknown if not a.startswith("-")]
        unknown = [a for a in unknown if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    hf_logging.disable_progress_bar()  # our own progress bar is the one to watch
    warnings.formatwarning = _one_line_warning
    console = Console(stderr=True)
    try:
        commands = {
            "train": _train,
            "eval": _eval,
            "prune": _prune,
            "serve-teacher": _serve_teacher,
            "demo": _demo,
            "plot": _plot,
            "models": _models,
        }
        if args.command in commands:
            return commands[args.command](args, console)
        if args.command == "config":
            _config_reference()
        else:
            _objectives()
        return EXIT_OK
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; resume with --resume[/]")
        return EXIT_INTERRUPTED
    except ValueError as err:  # ConfigError and the one-line errors of loaders
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except OSError as err:  # a file that cannot be read or written: its name is in the message
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        return EXIT_FAIL


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Python warnings (e.g. skipped data rows) as one `warning:` line, without the source
    line Python shows by default."""
    return f"warning: {message}\n"


def _train(args: argparse.Namespace, console: Console) -> int:
    from tropd.config import load_config
    from tropd.train import distributed, train
    from tropd.train.loop import TrainingStopped, objective_from_config
    from tropd.train.shutdown import RunStopped

    path, overrides = _config_and_overrides(args.arguments)
    config = load_config(path, overrides)
    objective_from_config(config)  # a bad objective stops here, before any process starts
    if args.nproc < 1:
        raise ValueError(f"--nproc {args.nproc}: give a number of processes >= 1")
    if args.nproc > 1:
        if "WORLD_SIZE" in os.environ:
            raise ValueError("--nproc starts torchrun itself; leave it out under torchrun")
        distributed.check_world_size(config, args.nproc)
        resume = ["--resume"] if args.resume else []
        tropd_args = ["train", path, *overrides, *resume]
        code = distributed.launch(args.nproc, tropd_args, config.distributed.timeout_s)
        return EXIT_STOPPED if code is None else code  # None: the ranks got the signal
    try:
        with distributed.process_group(config) as (rank, world_size):
            run_dir = train(config, resume=args.resume, rank=rank, world_size=world_size)
    except (distributed.RanksOutOfStep, TrainingStopped) as err:
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        return EXIT_FAIL
    except RunStopped as err:
        if rank == 0:  # all ranks stopped after the same step; one line says so
            console.print(str(err), style="yellow", markup=False, highlight=False, soft_wrap=True)
        return EXIT_STOPPED
    if rank != 0:
        return EXIT_OK
    skipped = _skipped_steps(run_dir)
    if skipped and skipped >= config.run.steps:
        console.print(
            f"[red]error:[/] every step of {run_dir} was skipped (non-finite loss or "
            "gradient), so the weights did not change; lower optim.lr or check the data",
            highlight=False,
        )
        return EXIT_FAIL
    if skipped:
        console.print(f"[yellow]warning:[/] {skipped} of {config.run.steps} steps were skipped")
    console.print(f"[green]done:[/] {run_dir}  (metrics.jsonl, samples.jsonl, final/)")
    return EXIT_OK


def _config_and_overrides(arguments: list[str]) -> tuple[str, list[str]]:
    """`tropd train`'s positional arguments, in any order: the config file (an existing
    file, or an argument without `=`) and the `key.sub=value` overrides, in their order."""
    paths = [a for a in arguments if "=" not in a or os.path.isfile(a)]
    overrides = [a for a in arguments if a not in paths]
    if len(paths) != 1:
        got = ", ".join(paths) if paths else "none"
        raise ValueError(
            f"tropd train takes one CONFIG file (got {got}); settings are key.sub=value"
        )
    return paths[0], overrides


def _skipped_steps(run_dir) -> int:
    """Steps of the finished run skipped as non-finite (its last metrics record says)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return int(json.loads(lines[-1]).get("skipped_steps", 0)) if lines else 0


def _eval(args: argparse.Namespace, console: Console) -> int:
    import json

    import yaml

    from tropd.kernels import use_onednn
    from tropd.model_names import load_eval_model
    from tropd.task_eval import EvalSettings, evaluate_on_task
    from tropd.tasks import get_task

    try:
        options = yaml.safe_load(args.options) if args.options else {}
        ks = tuple(int(k) for k in args.k.split(","))
    except (yaml.YAMLError, ValueError):
        raise ValueError("--options must be a YAML mapping and --k integers like 1,4") from None
    if not isinstance(options, dict):
        raise ValueError("--options must be a YAML mapping, e.g. '{path: data.jsonl}'")
    model, tokenizer, run_config = load_eval_model(args.model, args.dtype, args.device)
    use_onednn(model)
    name, system_prompt = args.task, args.system_prompt
    if name is None:
        if run_config is None:
            raise ValueError("--task is required unless MODEL is a run directory or checkpoint")
        name, options = run_config.task.name, {**run_config.task.options, **options}
        system_prompt = system_prompt or run_config.task.system_prompt
    settings = EvalSettings(
        samples=args.samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        num_items=args.num_items,
        ks=ks,
        batch_size=args.batch_size,
        seed=args.seed,
        system_prompt=system_prompt,
    )
    summary = evaluate_on_task(model, tokenizer, get_task(name, **options), settings, args.out)
    shown = {k: v for k, v in summary.items() if k != "settings"}
    Console().print_json(json.dumps(shown))
    if args.out:
        console.print(f"[green]done:[/] {args.out}  (results.jsonl, summary.json)")
    return EXIT_OK


def _prune(args: argparse.Namespace, console: Console) -> int:
    from tropd.compress import parse_layers
    from tropd.model_names import prune_to_dir

    out = prune_to_dir(args.teacher, parse_layers(args.layers), args.out, args.dtype)
    console.print(f"[green]done:[/] {out}")
    return EXIT_OK


def _positive(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _serve_teacher(args: argparse.Namespace, console: Console) -> int:
    from tropd.kernels import use_onednn
    from tropd.model_names import load_model, load_tokenizer
    from tropd.teacher.remote import TOKEN_ENV, read_token_file

    try:
        from tropd.teacher.server import Limits, check_binding, serve
    except ImportError:
        raise ValueError(
            "serve-teacher needs the serve extra: pip install 'tropd[serve]'"
        ) from None

    if args.token is not None:
        raise ValueError(
            "serve-teacher: --token would show the token to every user in the process list; "
            f"set ${TOKEN_ENV} or pass --token-file PATH"
        )
    token = read_token_file(args.token_file, "--token-file") if args.token_file else None
    token = token or os.environ.get(TOKEN_ENV) or None
    check_binding(args.host, token)
    for flag in ("max_body_mb", "max_answer_mb"):
        if not 0 < getattr(args, flag) < float("inf"):  # NaN too
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive, finite number of MB")
    limits = Limits(
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_request_tokens=args.max_request_tokens,
        chunk_tokens=args.chunk_tokens,
        max_new_tokens=args.max_new_tokens,
        max_answer_bytes=int(args.max_answer_mb * 2**20),
        max_top_k=args.max_top_k,
    )
    console.print(f"serving {args.model} on http://{args.host}:{args.port} (Ctrl-C stops)")
    model = load_model(args.model, args.dtype, args.device).eval().requires_grad_(False)
    use_onednn(model)
    tokenizer = load_tokenizer(args.model)
    serve(model, tokenizer, args.model, args.host, args.port, token, limits)
    return EXIT_OK


def _demo(args: argparse.Namespace, console: Console) -> int:
    import dataclasses
    import time

    from tropd.demo import FULL, QUICK, run_demo
    from tropd.objectives import list_objectives
    from tropd.recipes.mismatch import MISMATCH

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in list_objectives()]
    if unknown or not methods:
        raise ValueError(f"--methods: unknown {unknown}; valid: {', '.join(list_objectives())}")
    cells = tuple(c.strip() for c in args.cells.split(",") if c.strip())
    if not cells or set(cells) - set(MISMATCH):
        raise ValueError(f"--cells {args.cells!r}: use some of {', '.join(MISMATCH)}")
    settings = QUICK if args.quick else FULL
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps {args.steps}: give a number of steps >= 1")
        settings = dataclasses.replace(settings, steps=args.steps)
    out = args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.threads < 1:
        raise ValueError(f"--threads {args.threads}: give a number of threads >= 1")
    run_demo(
        out,
        cells=cells,
        methods=methods,
        seed=args.seed,
        settings=settings,
        threads=args.threads,
    )
    return EXIT_OK


def _plot(args: argparse.Namespace, console: Console) -> int:
    from tropd.plot import plot_runs

    written = plot_runs(args.runs, args.out, title=args.title)
    console.print(f"[green]done:[/] {len(written)} PNGs in {args.out}")
    return EXIT_OK


def _models(args: argparse.Namespace, console: Console) -> int:
    from tropd.recipes import cache
    from tropd.recipes.shipped import build_models, model_rows

    def accuracy(value: float | None) -> str:
        return "—" if value is None else f"{value:.3f}"

    if args.models_command == "list":
        rows = model_rows()
        if args.json:
            Console().print_json(json.dumps(rows))
            return EXIT_OK
        table = Table(title="tropd's built-in models (builtin:<task>:<role>, the demo's chain)")
        for column in ("name", "recipe key", "accuracy", "size", "shipped", "cached"):
            table.add_column(column, overflow="fold")
        for row in rows:
            size = row["size_bytes"]
            table.add_row(
                row["name"],
                row["key"],
                accuracy(row["accuracy"]),
                "—" if size is None else f"{size / 2**20:.2f} MiB",
                "yes" if row["shipped"] else "no",
                "yes" if row["cached"] else "no",
            )
        Console().print(table)
        return EXIT_OK
    out = args.out or cache.SHIPPED_DIR
    rows = build_models(args.names, out, force=args.force)
    table = Table(title=f"built models in {out}")
    for column in ("name", "recipe key", "shipped accuracy", "accuracy", "train s", "built"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            row["name"],
            row["key"],
            accuracy(row["shipped_accuracy"]),
            accuracy(row["accuracy"]),
            f"{row['train_seconds']:.0f}",
            "built" if row["built"] else "kept (today's recipe; --force rebuilds)",
        )
    Console().print(table)
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
