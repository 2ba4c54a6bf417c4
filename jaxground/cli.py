"""`jaxground train | eval | predict | convert | export | data | bench`.

Each subcommand lives in its own module with `add_arguments(parser)` and `run(args) -> int`; this file only
routes, importing a module when its command runs so that `--help` stays fast. `bench NAME` routes further to
`jaxground/bench/NAME.py`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from jaxground import host_memory

COMMANDS = {
    "train": ("jaxground.train.command", "train a NExT-Chat model (stage 1, 2 or 3) on a device mesh"),
    "eval": ("jaxground.eval.command", "evaluate a checkpoint: REC, RES, POPE, region captions, Visual7W"),
    "predict": ("jaxground.infer.command", "answer a prompt about one image; draws boxes and masks"),
    "convert": ("jaxground.convert.command", "convert PyTorch checkpoints (NExT-Chat, LLaMA, CLIP, SAM) to JAX"),
    "export": ("jaxground.convert.export_command", "export a JAX checkpoint back to PyTorch safetensors"),
    "data": ("jaxground.data.command", "generate or inspect datasets (e.g. `data shapes --out DIR`)"),
    "bench": ("jaxground.bench", "benchmarks against the PyTorch reference, printed (`bench NAME`)"),
}

TORCH_EXTRA = ("torch", "segment_anything")  # the `torch` extra: bench, export, .pth/.bin conversion


class BadArguments(Exception):
    """A command line argparse refuses: (the parser, its message)."""


class _Parser(argparse.ArgumentParser):
    """argparse's parser, raising `BadArguments` where it would print and exit, so that `main` can tell the other
    hosts of a multi-host command first."""

    def error(self, message: str):
        raise BadArguments(self, message)


def _bench_names() -> list[str]:
    from jaxground import bench

    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_"))


def _bench_refusals(run, prog: str):
    """`run` with a benchmark's `BenchError` (an option it cannot run with) printed as one line, exit status 2."""
    from jaxground.bench._common import BenchError

    def refusing(args) -> int:
        try:
            return run(args)
        except BenchError as e:
            print(f"{prog}: {e}", file=sys.stderr)
            return 2

    return refusing


def main(argv: list[str] | None = None) -> int:
    host_memory.configure(command_line=argv is None)  # JAXGROUND_MALLOC, before JAX allocates anything
    # transformers, imported for tokenizers and configs, would advise installing PyTorch on every command; the
    # commands that need PyTorch say so themselves (TORCH_EXTRA below)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="jaxground", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help() if not argv or argv[0] in ("-h", "--help") else parser.parse_args(argv[:1])
        return 0 if argv and argv[0] in ("-h", "--help") else 2

    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    prog = f"jaxground {name}"
    if name == "bench":
        names = _bench_names()
        if not rest or rest[0] in ("-h", "--help") or rest[0] not in names:
            print(f"usage: {prog} NAME [options]\n\nbenchmarks: {', '.join(names)}")
            return 0 if rest and rest[0] in ("-h", "--help") else 2
        module_name, prog, rest = f"jaxground.bench.{rest[0]}", f"{prog} {rest[0]}", rest[1:]

    try:
        module = importlib.import_module(module_name)
        sub_parser = _Parser(prog=prog, description=(module.__doc__ or help_text).strip())
        module.add_arguments(sub_parser)
        try:
            try:  # config overrides may sit between options (`eval --config C model.x=2 --tasks rec paths.y=...`)
                args = sub_parser.parse_intermixed_args(rest)
            except TypeError:  # argparse's refusal for a command with subcommands (`data`)
                args = sub_parser.parse_args(rest)
        except BadArguments as e:
            parser, message = e.args  # the parser that refused: a command's own subcommand's, e.g. `data shapes`
            parser.print_usage(sys.stderr)
            print(f"{parser.prog}: error: {message}", file=sys.stderr)
            if sub_parser.get_default("multi_host"):  # on several hosts, the others must stop too
                from jaxground import distributed

                distributed.refuse_arguments(rest, name, f"bad arguments: {message}")
            return 2
        from jaxground import distributed  # after --help: it imports jax

        run = _bench_refusals(module.run, prog) if name == "bench" else module.run
        return distributed.run_command(lambda: int(run(args) or 0))
    except KeyboardInterrupt:  # commands with work to keep (train, eval, predict) say what they kept themselves
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        if e.name not in TORCH_EXTRA:
            raise
        print(f"{prog} needs PyTorch ({e.name} is not installed): pip install -e '.[torch]' "
              "(bash launch/test.sh sets up .venv with it)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
