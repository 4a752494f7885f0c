"""bpfinit-webhook entry point (placeholder until the webhook lands)."""
import sys


def main(argv=None) -> int:
    print("bpfinit-webhook: not implemented yet", file=sys.stderr)
    return 2
