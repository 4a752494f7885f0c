"""Pure user-space logic: event -> Hubble-shaped flow, filters, --since, identity encoding, labels file."""
import ipaddress
import json

import pytest

from initagent import identity, obsmaps, observe
from initagent.obsmaps import FlowEvent

POD = {"namespace": "shop", "pod": "cart-7d9", "labels": {"app": "cart", "version": "v2"},
       "labels_truncated": False, "netns_cookie": 42}
PEER = {"namespace": "db", "pod": "pg-0", "labels": {"app": "pg"}, "labels_truncated": False, "netns_cookie": 43}


def v4(addr: str) -> bytes:
    return ipaddress.IPv4Address(addr).packed + bytes(12)


def make_event(dir=1, verdict=1, reason=0, src="10.250.0.2", sport=40000, dst="127.0.0.1", dport=15001,
               orig="10.96.0.10", oport=80, family=2, proto=6, uid=1000, gid=1000, suppressed=0, ts=5_000_000_000):
    ev = FlowEvent()
    ev.ts_ns, ev.netns_cookie, ev.pod_idx = ts, 42, 3
    ev.dir, ev.verdict, ev.reason, ev.l4_proto, ev.family, ev.version = dir, verdict, reason, proto, family, 1
    ev.src_port, ev.dst_port, ev.orig_dst_port = sport, dport, oport
    ev.uid, ev.gid, ev.suppressed = uid, gid, suppressed
    pack = (lambda a: ipaddress.ip_address(a).packed) if family == 10 else v4
    ev.src_addr[:] = pack(src)
    ev.dst_addr[:] = pack(dst)
    ev.orig_dst_addr[:] = pack(orig)
    return ev


def test_redirected_outbound_flow_is_hubble_shaped():
    rec = observe.event_to_flow(make_event(), POD, wall_offset_ns=1_700_000_000_000_000_000, node_name="n1")
    f = rec["flow"]
    assert rec["node_name"] == "n1" and rec["time"] == f["time"]
    assert f["time"] == "2023-11-14T22:13:25.000000000Z"
    assert f["verdict"] == "REDIRECTED" and f["Type"] == "L3_L4" and f["traffic_direction"] == "EGRESS"
    assert f["IP"] == {"source": "10.250.0.2", "destination": "10.96.0.10", "ipVersion": "IPv4"}
    assert f["l4"] == {"TCP": {"source_port": 40000, "destination_port": 80}}
    assert f["source"] == {"namespace": "shop", "pod_name": "cart-7d9", "labels": ["k8s:app=cart", "k8s:version=v2"]}
    assert f["destination"] == {}
    assert f["bpfinit"]["redirected_to"] == {"ip": "127.0.0.1", "port": 15001}
    assert f["bpfinit"]["original_destination"] == {"ip": "10.96.0.10", "port": 80}
    assert f["bpfinit"]["uid"] == 1000 and f["bpfinit"]["reason"] == "none"
    assert "drop_reason_desc" not in f
    json.dumps(rec)


def test_denied_flow_has_policy_denied_and_no_redirect():
    ev = make_event(verdict=4, reason=14, dst="203.0.113.9", dport=443, orig="203.0.113.9", oport=443)
    f = observe.event_to_flow(ev, POD, 0)["flow"]
    assert f["verdict"] == "DENIED" and f["drop_reason_desc"] == "POLICY_DENIED"
    assert f["bpfinit"]["reason"] == "egress_policy" and "redirected_to" not in f["bpfinit"]


def test_inbound_flow_puts_pod_as_destination_and_peer_as_source():
    ev = make_event(dir=2, verdict=2, src="10.250.0.9", dst="10.250.0.2", dport=8080, orig="10.250.0.2", oport=8080)
    f = observe.event_to_flow(ev, POD, 0, peer=PEER)["flow"]
    assert f["traffic_direction"] == "INGRESS"
    assert f["destination"]["pod_name"] == "cart-7d9" and f["source"]["pod_name"] == "pg-0"


def test_refused_and_unknown_ids_and_ipv6():
    ev = make_event(dir=2, verdict=5, reason=17, family=10, src="fd00::9", dst="fd00::2", dport=8080,
                    orig="fd00::2", oport=8080, uid=obsmaps.FLOW_ID_UNKNOWN, gid=obsmaps.FLOW_ID_UNKNOWN,
                    suppressed=7)
    f = observe.event_to_flow(ev, None, 0)["flow"]
    assert f["IP"]["ipVersion"] == "IPv6" and f["IP"]["destination"] == "fd00::2"
    assert f["drop_reason_desc"] == "PROXY_NOT_LISTENING"
    assert "uid" not in f["bpfinit"] and f["bpfinit"]["suppressed_before"] == 7
    assert f["destination"] == {} and f["source"] == {}


def test_table_line_names_pod_proxy_and_verdict():
    line = observe.format_flow_line(observe.event_to_flow(make_event(), POD, 0))
    assert "shop/cart-7d9 (10.250.0.2:40000) -> 10.96.0.10:80" in line
    assert "REDIRECTED (none) -> proxy 127.0.0.1:15001" in line


def records():
    return {
        "redir": observe.event_to_flow(make_event(), POD, 0),
        "deny": observe.event_to_flow(make_event(verdict=4, reason=14, orig="203.0.113.9", oport=443,
                                                 dst="203.0.113.9", dport=443), POD, 0),
        "bypass": observe.event_to_flow(make_event(verdict=3, reason=9, orig="192.168.7.7", oport=5432,
                                                   dst="192.168.7.7", dport=5432), PEER, 0),
    }


@pytest.mark.parametrize("kwargs,expected", [
    ({}, {"redir", "deny", "bypass"}),
    ({"namespace": ["shop"]}, {"redir", "deny"}),
    ({"pod": ["db/pg-0"]}, {"bypass"}),
    ({"pod": ["cart-7d9"]}, {"redir", "deny"}),
    ({"verdict": ["denied,bypassed"]}, {"deny", "bypass"}),
    ({"reason": ["excluded_cidr"]}, {"bypass"}),
    ({"to_cidr": ["203.0.113.0/24"]}, {"deny"}),
    ({"to_cidr": ["10.96.0.0/12", "192.168.0.0/16"]}, {"redir", "bypass"}),
    ({"to_cidr": ["fd00::/8"]}, set()),
    ({"port": ["443"]}, {"deny"}),
    ({"port": ["40000"]}, {"redir", "deny", "bypass"}),   # source port matches too
    ({"namespace": ["shop"], "verdict": ["REDIRECTED"]}, {"redir"}),
])
def test_filters_select_exactly(kwargs, expected):
    flt = observe.FlowFilter.from_args(**kwargs)
    assert {k for k, r in records().items() if flt.match(r)} == expected


def test_since_filter_uses_event_wall_time():
    flt = observe.FlowFilter.from_args(since="10s", now_ns=100 * 10**9)
    rec = records()["redir"]
    assert flt.match(rec, wall_ns=95 * 10**9)
    assert not flt.match(rec, wall_ns=85 * 10**9)


@pytest.mark.parametrize("text,expected", [
    ("90s", 910 * 10**9), ("1.5m", 910 * 10**9), ("250ms", 999_750_000_000),
    ("1970-01-01T00:16:00Z", 960 * 10**9), ("1970-01-01T00:16:00+00:00", 960 * 10**9),
])
def test_parse_since(text, expected):
    assert observe.parse_since(text, now_ns=1000 * 10**9) == expected


@pytest.mark.parametrize("kwargs,message", [
    ({"verdict": ["DROPPED"]}, "--verdict 'DROPPED'"),
    ({"reason": ["nope"]}, "--reason 'nope'"),
    ({"to_cidr": ["10.0.0.0/33"]}, "--to-cidr"),
    ({"port": ["http"]}, "--port 'http'"),
    ({"port": ["70000"]}, "--port"),
    ({"since": "yesterday"}, "--since 'yesterday'"),
])
def test_bad_filters_are_one_line_errors(kwargs, message):
    with pytest.raises(observe.ObserveError, match=message.replace("(", r"\(")):
        observe.FlowFilter.from_args(**kwargs)


def test_downward_labels_file_parsing():
    text = 'app="cart"\nversion="v2"\nteam="a \\"quoted\\" name"\n\n'
    assert identity.parse_downward_labels(text) == {"app": "cart", "version": "v2", "team": 'a "quoted" name'}
    with pytest.raises(identity.IdentityError, match="line 1"):
        identity.parse_downward_labels("app=cart")


def test_identity_from_env_reads_labels_file(tmp_path):
    (tmp_path / "labels").write_text('app="x"\n')
    env = {"POD_NAMESPACE": "ns", "POD_NAME": "p", "BPFINIT_POD_LABELS_FILE": str(tmp_path / "labels")}
    assert identity.identity_from_env(env) == ("ns", "p", {"app": "x"})
    assert identity.identity_from_env({"POD_NAME": "p"}) is None
    with pytest.raises(identity.IdentityError, match="cannot read labels file"):
        identity.identity_from_env({**env, "BPFINIT_POD_LABELS_FILE": str(tmp_path / "missing")})


def test_identity_encoding_roundtrip_and_truncation():
    ident = identity.encode(7, "shop", "cart-7d9", {"app": "cart"})
    assert identity.decode(ident) == {"namespace": "shop", "pod": "cart-7d9", "labels": {"app": "cart"},
                                      "labels_truncated": False, "netns_cookie": 7}
    many = {f"label-{i:03d}": "v" * 20 for i in range(60)}
    many["huge"] = "x" * 900
    dec = identity.decode(identity.encode(7, "shop", "cart", many))
    assert dec["labels_truncated"] and "huge" not in dec["labels"] and len(dec["labels"]) > 20
    assert all(dec["labels"][k] == many[k] for k in dec["labels"])


@pytest.mark.parametrize("ns,name,msg", [
    ("Shop", "x", "namespace 'Shop'"), ("", "x", "namespace ''"), ("a" * 64, "x", "namespace"),
    ("ns", "", "pod name ''"), ("ns", "a_b", "pod name 'a_b'"),
])
def test_identity_rejects_bad_names(ns, name, msg):
    with pytest.raises(identity.IdentityError, match=msg):
        identity.encode(1, ns, name, {})
