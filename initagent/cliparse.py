"""argparse with bpfinit-agent's error convention: a bad argument is one line on stderr and exit 2."""
from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """Like argparse.ArgumentParser, but an error prints `<prog>: <reason>` only (no usage block), and
    option prefixes are not accepted (`--js` is not `--json`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")
