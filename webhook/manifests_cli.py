"""`bpfinit-webhook manifests`: plugs webhook/render.py into the CLI (see webhook/cli.py)."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from webhook import render

    parser = subparsers.add_parser("manifests", help="render the Kubernetes manifests (one YAML stream)",
                                   description=render._parser().description, add_help=False,
                                   parents=[render._parser()])
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from webhook import render

    return render.run(args)
