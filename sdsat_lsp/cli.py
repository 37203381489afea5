"""`sdsat-lsp`: the language server (`--stdio`, `--tcp HOST:PORT`) and the tools around it.

Small on purpose: argparse, logging to stderr (stdout belongs to the LSP stream), and one place
where a user-facing `SdsatError` becomes a message and a non-zero exit instead of a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .errors import SdsatError


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="compare autoregressive and SDSAT decoding on real code")
    from . import bench

    bench.add_arguments(p)
    p.set_defaults(run=bench.main)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="SDSAT fine-tuning (or training from scratch) with checkpoints and resume")
    from . import train

    train.add_arguments(p)
    p.set_defaults(run=train.main)


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="completion quality on held-out code (exact match, edit similarity)")
    from . import evaluate

    evaluate.add_arguments(p)
    p.set_defaults(run=evaluate.main)


def _stress_parser(sub) -> None:
    p = sub.add_parser("stress", help="drive the server over stdio with valid and hostile traffic; nothing may be lost")
    from . import stress

    stress.add_arguments(p)
    p.set_defaults(run=stress.main)


def _draft_store_parser(sub) -> None:
    p = sub.add_parser("draft-store", help="build a model's draft store (retrieval drafts) ahead of time; cached")
    from . import draftstore

    draftstore.add_arguments(p)
    p.set_defaults(run=draftstore.main)


def _corpus_parser(sub) -> None:
    p = sub.add_parser("corpus", help="token shards and a manifest from the standard library and the venv's package sources")
    from . import corpus

    corpus.add_arguments(p)
    p.set_defaults(run=corpus.main)


TOOLS = ("bench", "train", "eval", "stress", "draft-store", "corpus")


def build_parser(tools: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdsat-lsp", description=__doc__.splitlines()[0])
    parser.add_argument("--stdio", action="store_true", help="serve LSP over stdin/stdout (the default)")
    parser.add_argument("--tcp", metavar="HOST:PORT", help="serve LSP over TCP")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument("--log-file", help="log here instead of stderr")
    # Server start-up settings (initializationOptions from the editor override them).
    parser.add_argument("--model", help="server: model folder or hub id (default: the embedded model)")
    parser.add_argument("--quantize", help="server: auto | none | nf4 | int8 | dynamic-int8")
    parser.add_argument("--device", help="server: auto | cpu | cuda | cuda:N")
    sub = parser.add_subparsers(dest="command")
    if tools:
        _bench_parser(sub)
        _train_parser(sub)
        _eval_parser(sub)
        _stress_parser(sub)
        _draft_store_parser(sub)
        _corpus_parser(sub)
    return parser


def _setup_logging(verbose: int, log_file: str | None) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    logging.basicConfig(level=level, handlers=[handler], format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    # The server must answer `initialize` within a second; the tools' parsers import torch (~3-8 s),
    # so serving builds the parser without them.
    serving = not any(a in TOOLS or a in ("-h", "--help") for a in argv)
    parser = build_parser(tools=not serving)
    args = parser.parse_args(argv)
    args.argv = argv  # what a tool records as its command (sys.argv is not it when main() is called)
    _setup_logging(args.verbose, args.log_file)
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
