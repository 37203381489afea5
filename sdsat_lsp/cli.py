"""`sdsat-lsp`: the language server (`--stdio`, `--tcp HOST:PORT`) and the tools around it.

Small on purpose: argparse, logging to stderr (stdout belongs to the LSP stream), and one place
where a user-facing `SdsatError` becomes a message and a non-zero exit instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .backends import BACKENDS
from .settings import CLI_FLAGS
from .errors import SdsatError


# Each tool: its module (imported only when the tools' parser is built) and its help line.
TOOL_MODULES = {
    "bench": (".tools.bench", "compare autoregressive and SDSAT decoding on real code"),
    "train": (".training.train", "SDSAT fine-tuning (or training from scratch) with checkpoints and resume"),
    "eval": (".tools.evaluate", "completion quality on held-out code (exact match, edit similarity)"),
    "stress": (".tools.stress", "drive the server over stdio with valid and hostile traffic; nothing may be lost"),
    "draft-store": (".tools.distill", "build a model's draft store (retrieval drafts) ahead of time; cached"),
    "corpus": (".training.corpus", "token shards and a manifest from the standard library and the venv's package sources"),
}


def _tool_parser(sub, name: str) -> None:
    module_name, help_line = TOOL_MODULES[name]
    p = sub.add_parser(name, help=help_line)
    module = importlib.import_module(module_name, __package__)
    module.add_arguments(p)
    p.set_defaults(run=module.main)


TOOLS = ("bench", "train", "eval", "stress", "draft-store", "corpus")


def build_parser(tools: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdsat-lsp", description=__doc__.splitlines()[0])
    parser.add_argument("--stdio", action="store_true", help="serve LSP over stdin/stdout (the default)")
    parser.add_argument("--tcp", metavar="HOST:PORT", help="serve LSP over TCP, loopback only, one client with the token")
    parser.add_argument("--tcp-token", metavar="TOKEN",
                        help="with --tcp: the token the client sends as initializationOptions.token "
                             "(default: $SDSAT_LSP_TCP_TOKEN, which other users cannot read in the process "
                             "list, else a new one, printed on stderr)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument("--log-file", help="log here instead of stderr")
    for flag, help_line in CLI_FLAGS.items():  # the server's start-up settings
        parser.add_argument(flag, help=f"server: {help_line}", **({"choices": BACKENDS} if flag == "--backend" else {}))
    sub = parser.add_subparsers(dest="command")
    if tools:
        for name in TOOLS:
            _tool_parser(sub, name)
    for p in (parser, *sub.choices.values()):  # before or after the tool's name
        # SUPPRESS: a tool's parser must not reset what was given before its name.
        default = None if p is parser else argparse.SUPPRESS
        p.add_argument("--allow-download", action="store_true", default=False if p is parser else default,
                       help="let a hub id that is not in the local cache be downloaded (size checked first); "
                            "without it nothing is fetched from the network")
        p.add_argument("--max-download-gb", type=float, default=20.0 if p is parser else default,
                       help="with --allow-download: the most one model may download (default 20)")
    return parser


def _setup_logging(verbose: int, log_file: str | None) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    logging.basicConfig(level=level, handlers=[handler], format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # OpenMP threads that spin while they wait collapse when another process holds a core: on 2
    # busy cores, 2 spinning threads measured 570-790 ms a token against 6-25 ms when they sleep
    # (README, "Threads"). Read once, when torch loads OpenMP; the user's own value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = sys.argv[1:] if argv is None else list(argv)
    # The server must answer `initialize` within a second; the tools' parsers import torch (~3-8 s),
    # so serving builds the parser without them.
    serving = not any(a in TOOLS or a in ("-h", "--help") for a in argv)
    parser = build_parser(tools=not serving)
    args = parser.parse_args(argv)
    args.argv = argv  # what a tool records as its command (sys.argv is not it when main() is called)
    _setup_logging(args.verbose, args.log_file)
    if args.allow_download:  # read by model.resolve_folder, here and in servers this process starts
        os.environ["SDSAT_LSP_DOWNLOAD_CAP_BYTES"] = str(int(args.max_download_gb * 2**30))
    try:
        if args.command is None:
            from .server import serve  # the server module owns start-up and transports

            return serve(args) or 0
        return args.run(args) or 0
    except SdsatError as exc:
        print(f"sdsat-lsp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
