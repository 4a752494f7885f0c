"""Pure parts of the agent: config -> map entries, egress port sets, id mapping, kernel-header discovery."""
from __future__ import annotations

import ipaddress
import struct

import pytest

from initagent import headers, podconfig
from initagent.flags import EgressRule, parse

net = ipaddress.ip_network


def facts(**kw):
    base = dict(local_networks=(net("127.0.0.0/8"), net("::1/128"), net("10.250.0.2/32")), ipv6_enabled=False)
    base.update(kw)
    return podconfig.PodFacts(**base)


def test_port_blocks_cover_exactly():
    for low, high in ((0, 65535), (8000, 8100), (9092, 9092), (1, 1023), (65535, 65535), (1000, 1999)):
        covered = set()
        for start, bits in podconfig.port_blocks(low, high):
            size = 1 << (16 - bits)
            assert start % size == 0                       # aligned prefix block
            covered.update(range(start, start + size))
        assert covered == set(range(low, high + 1)), (low, high)


def test_egress_sets_inherit_ancestor_ranges():
    rules = (EgressRule(net("10.0.0.0/8"), 80, 80), EgressRule(net("10.1.0.0/16"), 443, 443))
    sets = dict(podconfig.egress_sets(rules))
    assert sets[net("10.0.0.0/8")] == [(80, 80)]
    assert sets[net("10.1.0.0/16")] == [(80, 80), (443, 443)]   # the /16 also allows the /8's port


def test_id_mapping_through_user_namespace():
    uid_map = ((0, 100000, 65536),)
    assert podconfig.map_id(1337, uid_map, "uid") == 101337
    with pytest.raises(podconfig.ConfigError, match="not mapped"):
        podconfig.map_id(70000, uid_map, "uid")
    cfg = parse(["-u", "1337"], {})
    value = podconfig.pod_cfg_value(cfg, facts(uid_map=uid_map, gid_map=uid_map), 7)
    assert podconfig.unpack_pod_cfg(value)["first_uid"] == 101337


def test_entries_for_a_typical_config():
    cfg = parse(["-i", "10.0.0.0/8,fd00::/8", "-x", "10.9.0.0/16", "-o", "5432", "-q", "9000", "-u", "1337"],
                {"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "888"})
    entries = podconfig.build_entries(cfg, 5, facts(group_ids=(("888", 888),)))
    assert len(entries["cidr4"]) == 2 + 2      # 127/8 + pod IP, -i v4, -x
    assert len(entries["cidr6"]) == 1 + 1      # ::1, -i v6
    kinds = sorted(struct.unpack("=III", k)[1] for k, _ in entries["pod_ids"])
    assert kinds == [podconfig.ID_PROXY_UID, podconfig.ID_PROXY_GID, podconfig.ID_OWNER_GROUP,
                     podconfig.PORT_OUT_EXCLUDE, podconfig.PORT_OUT_INCLUDE]
    assert all(podconfig.key_pod_idx(m, k) == 5 for m, rows in entries.items() for k, _ in rows)
    key = podconfig.cidr_key(net("10.9.0.0/16"), 5, podconfig.CIDR_EXCLUDE)[1]
    assert struct.unpack_from("=I", key)[0] == 64 + 16


def test_unknown_owner_group_is_an_error():
    cfg = parse([], {"ISTIO_OUTBOUND_OWNER_GROUPS": "nosuchgroup"})
    with pytest.raises(podconfig.ConfigError, match="nosuchgroup"):
        podconfig.build_entries(cfg, 1, facts())


def test_pod_to_pod_bit_only_with_accelerate():
    """CFG_ACCEL_POD_TO_POD is set only when accelerate is on too; alone it changes no bit."""
    def flags(argv):
        return podconfig.pod_flags(parse(argv, {}), facts())
    assert flags(["--accelerate", "--accelerate-pod-to-pod"]) & podconfig.CFG_ACCEL_POD_TO_POD
    assert flags(["--accelerate", "--accelerate-pod-to-pod"]) & podconfig.CFG_ACCELERATE
    assert not flags(["--accelerate"]) & podconfig.CFG_ACCEL_POD_TO_POD
    assert flags(["--accelerate-pod-to-pod"]) == flags([])
    assert not flags(["--accelerate-pod-to-pod"]) & (podconfig.CFG_ACCEL_POD_TO_POD | podconfig.CFG_ACCELERATE)
    assert podconfig.pod_flags(parse(["--accelerate"], {"BPFINIT_ACCEL_POD_TO_POD": "1"}), facts()) \
        & podconfig.CFG_ACCEL_POD_TO_POD


def test_digest_ignores_pod_idx_but_not_config():
    a = podconfig.config_digest(parse(["-i", "*"], {}), facts())
    assert a == podconfig.config_digest(parse(["-i", "*"], {}), facts())
    assert a != podconfig.config_digest(parse(["-i", "*", "-o", "1"], {}), facts())


def make_split_headers(root, version):
    build = root / f"linux-headers-{version}-amd64"
    common = root / f"linux-headers-{version}-common"
    for d in (build / "include" / "generated" / "uapi", build / "arch" / "x86" / "include" / "generated",
              common / "include" / "linux", common / "arch" / "x86" / "include"):
        d.mkdir(parents=True)
    return build, common


def test_headers_nearest_debian_split_package(tmp_path, monkeypatch):
    monkeypatch.setattr(headers, "_arch", lambda: "x86")
    make_split_headers(tmp_path, "5.10.0-30")
    build, common = make_split_headers(tmp_path, "6.1.0-56")
    found = headers._from_usr_src("6.18.44-fc", root=tmp_path)
    assert found.source == str(common) and f"-I{build}/include" in found.cflags
    found = headers._from_usr_src("5.10.200", root=tmp_path)
    assert found.version == "5.10.0-30"


def test_headers_explicit_dir_and_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(headers, "_arch", lambda: "x86")
    build, common = make_split_headers(tmp_path, "6.1.0-1")
    assert headers.from_dir(build).source == str(common)
    assert headers.from_dir(common).source == str(common)
    with pytest.raises(headers.HeadersError, match="not a directory"):
        headers.from_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(headers.HeadersError, match="no usable"):
        headers.from_dir(tmp_path / "empty")


@pytest.mark.kernel
def test_headers_found_on_this_machine():
    found = headers.find()
    assert found.source and all(flag.startswith("-I") for flag in found.cflags)
