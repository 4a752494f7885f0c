"""bpfinit-agent entry point (placeholder until the agent lands)."""
import sys


def main(argv=None) -> int:
    print("bpfinit-agent: not implemented yet", file=sys.stderr)
    return 2
