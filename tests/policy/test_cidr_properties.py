"""CIDR arithmetic used for containment checks, against brute force on small address spaces."""
from __future__ import annotations

import ipaddress

from hypothesis import given, settings, strategies as st

from webhook.validate import cidr_difference

# networks inside 10.0.0.0/24 (256 addresses): brute force is cheap and exact
small_nets = st.builds(lambda addr, plen: ipaddress.ip_network(f"10.0.0.{addr}/{plen}", strict=False),
                       st.integers(0, 255), st.integers(24, 32))


def addresses(nets):
    return {int(a) for n in nets for a in n}


@settings(max_examples=300, deadline=None)
@given(st.lists(small_nets, max_size=6), st.lists(small_nets, max_size=6))
def test_difference_is_exact(a, b):
    result = cidr_difference(a, b)
    assert addresses(result) == addresses(a) - addresses(b)
    # and it is a set of disjoint CIDRs
    assert sum(n.num_addresses for n in result) == len(addresses(result))


@settings(max_examples=100, deadline=None)
@given(st.lists(small_nets, min_size=1, max_size=4))
def test_union_coverage(parts):
    """A CIDR covered by the union of several allowed CIDRs counts as inside (no single one needed)."""
    whole = ipaddress.ip_network("10.0.0.0/24")
    covered = not cidr_difference([whole], parts)
    assert covered == (addresses(parts) >= addresses([whole]))


def test_families_do_not_mix():
    v4, v6 = ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")
    assert cidr_difference([v4, v6], [v4]) == [v6]
