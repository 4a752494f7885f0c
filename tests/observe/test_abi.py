"""The Python mirror of bpf/events.h (initagent/obsmaps.py) matches the C definitions."""
import ctypes as ct
import re
from pathlib import Path

from initagent import obsmaps

EVENTS_H = (Path(__file__).resolve().parents[2] / "bpf" / "events.h").read_text()


def c_macros(prefix: str) -> dict[str, int]:
    found = {}
    for name, value in re.findall(rf"^#define ({prefix}[A-Z0-9_]+)\s+(\d+)\b", EVENTS_H, re.M):
        found[name] = int(value)
    return found


def test_directions_match():
    c = {v: k[len("DIR_"):] for k, v in c_macros("DIR_").items()}
    assert c == obsmaps.DIR_NAMES


def test_verdicts_match():
    c = {v: k[len("VERDICT_"):] for k, v in c_macros("VERDICT_").items()}
    assert c == obsmaps.VERDICT_NAMES


def test_every_reason_number_has_one_python_name():
    c = c_macros("REASON_")
    count = c.pop("REASON__COUNT")
    c.pop("REASON_DEFINED")
    numbers = sorted(set(c.values()))
    assert numbers == list(range(count))
    assert sorted(obsmaps.REASON_NAMES) == numbers
    # Python names are the C names, lower-case, modulo the documented spellings.
    spelled = {"EXCLUDED_IFACE": "excluded_interface", "PASSTHROUGH_SRC": "passthrough_source",
               "LOCAL_DST": "local_destination", "EGRESS_DENIED": "egress_policy", "IPV6_OFF": "ipv6_disabled"}
    for name, number in c.items():
        if name.startswith("REASON_") and "__" not in name:
            short = name[len("REASON_"):]
            if obsmaps.REASON_NAMES[number] in (spelled.get(short), short.lower()):
                continue
            # synonyms (#define REASON_INTERFACE REASON_EXCLUDED_IFACE) are not numeric and not listed here
            raise AssertionError(f"{name}={number} but Python says {obsmaps.REASON_NAMES[number]}")


def test_stats_match():
    body = EVENTS_H[EVENTS_H.index("enum obs_stat {"):]
    body = body[:body.index("};")]
    pairs = dict((int(v), k) for k, v in re.findall(r"OBS_STAT_([A-Z_]+) = (\d+)", body))
    pairs.pop(4)  # __COUNT
    assert {k: v.lower() for k, v in pairs.items()} == obsmaps.STAT_NAMES


def test_struct_sizes_are_the_static_asserts():
    asserted = dict(re.findall(r"_Static_assert\(sizeof\(struct (\w+)\) == (\d+)", EVENTS_H))
    assert int(asserted["flow_event"]) == ct.sizeof(obsmaps.FlowEvent)
    assert int(asserted["obs_counter_key"]) == ct.sizeof(obsmaps.CounterKey)
    assert int(asserted["obs_identity"]) == ct.sizeof(obsmaps.ObsIdentity)
    assert int(asserted["obs_config"]) == ct.sizeof(obsmaps.ObsConfig)


def test_flow_event_field_order_matches_c():
    body = EVENTS_H[EVENTS_H.index("struct flow_event {"):]
    body = body[:body.index("};")]
    c_fields = re.findall(r"__u\d+\s+(\w+)(?:\[\d+\])?;", body)
    assert c_fields == [f[0] for f in obsmaps.FlowEvent._fields_]


def test_defaults_match():
    assert int(re.search(r"#define OBS_DEFAULT_RATE (\d+)u", EVENTS_H).group(1)) == obsmaps.OBS_DEFAULT_RATE
    assert int(re.search(r"#define OBS_DEFAULT_BURST (\d+)u", EVENTS_H).group(1)) == obsmaps.OBS_DEFAULT_BURST
