"""Per-pod decision counters read from the pinned `obs_counters` map (exact; summed over CPUs).

    pods = counters.pod_counters(bpffs)      # list of {"namespace", "pod", "counters": [...], "totals": {...}}
    counters.node_stats(bpffs)               # {"emitted", "lost", "suppressed", "counter_full"}
    print(counters.format_table(pods))       # what `bpfinit-agent status` shows

Used by `bpfinit-agent status` and the Prometheus exporter.
"""
from __future__ import annotations

from pathlib import Path

from initagent import identity, obsmaps
from initagent.obsmaps import CounterKey

TOTAL_KEYS = ("redirected", "captured", "bypassed", "denied", "refused", "dns")


def read_counters(pins: obsmaps.ObsPins) -> list[dict]:
    """Every non-zero counter of one program generation: {pod_idx, direction, verdict, reason, count}."""
    rows = []
    with pins.open("obs_counters") as m:
        for raw, per_cpu in m.items(limit=m.max_entries + 1):
            count = sum(int.from_bytes(v[:8], "little") for v in per_cpu)
            key = CounterKey.from_buffer_copy(raw)
            rows.append({
                "pod_idx": key.pod_idx,
                "direction": obsmaps.DIR_NAMES.get(key.dir, str(key.dir)),
                "verdict": obsmaps.VERDICT_NAMES.get(key.verdict, str(key.verdict)),
                "reason": obsmaps.REASON_NAMES.get(key.reason, str(key.reason)),
                "count": count,
            })
    rows.sort(key=lambda r: (r["pod_idx"], r["direction"], r["verdict"], r["reason"]))
    return rows


def read_stats(pins: obsmaps.ObsPins) -> dict[str, int]:
    stats = {}
    with pins.open("obs_stats") as m:
        for idx, name in obsmaps.STAT_NAMES.items():
            per_cpu = m.lookup(idx.to_bytes(4, "little")) or []
            stats[name] = sum(int.from_bytes(v[:8], "little") for v in per_cpu)
    return stats


def totals(rows: list[dict]) -> dict[str, int]:
    """Headline numbers per pod: redirected/captured/bypassed/denied/refused, and DNS captures."""
    out = dict.fromkeys(TOTAL_KEYS, 0)
    for r in rows:
        if r["direction"] == "DNS":
            out["dns"] += r["count"]
        verdict = r["verdict"].lower()
        if verdict in out:
            out[verdict] += r["count"]
    return out


def pod_counters(bpffs: Path | str) -> list[dict]:
    """Counters grouped per pod with its identity, over every program generation on the node."""
    pods = []
    for pins in obsmaps.require_generations(bpffs):
        idents = identity.all_identities(pins)
        by_pod: dict[int, list[dict]] = {}
        for row in read_counters(pins):
            by_pod.setdefault(row["pod_idx"], []).append(row)
        for pod_idx in sorted(set(by_pod) | set(idents)):
            ident = idents.get(pod_idx) or {}
            rows = [{k: v for k, v in r.items() if k != "pod_idx"} for r in by_pod.get(pod_idx, [])]
            pods.append({
                "generation": pins.generation,
                "pod_idx": pod_idx,
                "namespace": ident.get("namespace", ""),
                "pod": ident.get("pod", ""),
                "labels": ident.get("labels", {}),
                "counters": rows,
                "totals": totals(rows),
            })
    return pods


def node_stats(bpffs: Path | str) -> dict[str, int]:
    total = dict.fromkeys(obsmaps.STAT_NAMES.values(), 0)
    for pins in obsmaps.require_generations(bpffs):
        for k, v in read_stats(pins).items():
            total[k] += v
    return total


def pod_name(pod: dict) -> str:
    return f"{pod['namespace']}/{pod['pod']}" if pod["pod"] else f"<unregistered pod_idx {pod['pod_idx']}>"


def format_table(pods: list[dict], stats: dict[str, int] | None = None) -> str:
    """Readable per-pod counters: one line per pod with totals, then one line per non-zero counter."""
    lines = []
    for pod in pods:
        t = pod["totals"]
        lines.append(f"{pod_name(pod)}  redirected={t['redirected']} captured={t['captured']} "
                     f"bypassed={t['bypassed']} denied={t['denied']} refused={t['refused']} dns={t['dns']}")
        for r in pod["counters"]:
            lines.append(f"    {r['direction']:<9} {r['verdict']:<11} {r['reason']:<20} {r['count']}")
    if stats is not None:
        lines.append(f"events: emitted={stats['emitted']} lost={stats['lost']} "
                     f"suppressed={stats['suppressed']} counter_full={stats['counter_full']}")
    return "\n".join(lines) if lines else "no pods registered"


def for_pod(pin_dir: Path | str, pod_idx: int) -> dict:
    """One pod's counters in one generation (what `status` shows for the pod it runs in)."""
    pins = obsmaps.ObsPins(Path(pin_dir))
    rows = [{k: v for k, v in r.items() if k != "pod_idx"} for r in read_counters(pins) if r["pod_idx"] == pod_idx]
    return {"counters": rows, "totals": totals(rows)}


def render_pod(report: dict) -> list[str]:
    t = report["totals"]
    lines = [f"  decisions: redirected={t['redirected']} captured={t['captured']} bypassed={t['bypassed']} "
             f"denied={t['denied']} refused={t['refused']} dns={t['dns']}"]
    lines += [f"    {r['direction']:<9} {r['verdict']:<11} {r['reason']:<20} {r['count']}" for r in report["counters"]]
    return lines


def cmd_all(bpffs: Path | str, as_json: bool) -> int:
    """`bpfinit-agent status --all`: every pod's counters on this node (table, or JSON with --json)."""
    import json
    import sys
    try:
        pods, stats = pod_counters(bpffs), node_stats(bpffs)
    except obsmaps.BpfError as e:
        print(f"bpfinit-agent: status failed: {e}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps({"pods": pods, "events": stats}, indent=2, sort_keys=True))
    else:
        print(format_table(pods, stats))
    return 0
