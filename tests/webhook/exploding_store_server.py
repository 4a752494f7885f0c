"""`bpfinit-webhook serve` (same flags, real gunicorn + TLS) with a policy store whose every read fails,
as a bug deep in the policy code would. Used by tests/webhook/test_internal_errors.py."""
from __future__ import annotations

import sys

from webhook import cli, policy

FAILURE = "policy index corrupted: generation 7 has no settings\nsecond line must not reach the user"


class ExplodingPolicyStore(policy.PolicyStore):
    """A real PolicyStore whose readers raise: /validate reads `.current()`, /mutate `.egress_allow_for()`."""

    def current(self) -> policy.PolicySet:
        raise RuntimeError(FAILURE)

    def egress_allow_for(self, pod, namespace):
        raise KeyError("egress allow-list lookup failed for " + namespace)


def exploding_store_from_args(_args) -> ExplodingPolicyStore:
    return ExplodingPolicyStore()


if __name__ == "__main__":
    # The serve command builds its store through this one function; everything else is the real CLI.
    policy.store_from_args = exploding_store_from_args
    sys.exit(cli.main(["serve", *sys.argv[1:]]))
