"""`bpfinit-agent status`: what is attached to this pod and its effective config."""
from __future__ import annotations

from initagent import attach, bpfsys, loader, netns, podconfig


def pod_status(bpffs: str, netns_path: str = "") -> dict:
    if netns_path:
        netns.enter(netns_path)
    cookie = netns.cookie()
    report: dict = {"netns_cookie": cookie, "configured": False, "builds": []}
    for directory in loader.builds(bpffs, must_exist=True):
        report["builds"].append(directory.name)
        build = loader.Build(directory, [p for p in loader.PROGRAMS if (directory / "progs" / p.name).exists()])
        with build:
            cfg = attach._read_cfg(build, cookie)
            if not cfg:
                continue
            info = attach._read_info(build, cfg["pod_idx"]) or {}
            pod_dir = attach.pods_root(bpffs) / attach.pod_key(cookie)
            links = {}
            for spec in build.programs:
                path = pod_dir / spec.name
                if path.exists():
                    with bpfsys.Fd(bpfsys.obj_get(str(path))) as fd:
                        links[spec.name] = bpfsys.link_info(fd.fd)
            counts = {}
            for name, size in podconfig.LIST_MAPS.items():
                counts[name] = sum(1 for k in bpfsys.map_keys(build.map_fd(name), size)
                                   if podconfig.key_pod_idx(name, k) == cfg["pod_idx"])
            report.update(configured=True, build=directory.name, pod_cfg=cfg, registry=info, links=links,
                          entries=counts, pins=str(pod_dir))
            from initagent import counters  # observability: this pod's decision counters
            report["decisions"] = counters.for_pod(directory, cfg["pod_idx"])
    return report


def render(report: dict) -> str:
    if not report.get("configured"):
        return f"not configured: no bpfinit config for this netns (cookie {report['netns_cookie']})"
    cfg = report["pod_cfg"]
    lines = [f"configured: pod_idx={cfg['pod_idx']} build={report['build']} netns_cookie={report['netns_cookie']}",
             f"  proxy port {cfg['proxy_port']}, inbound {cfg['inbound_capture_port']}, tunnel "
             f"{cfg['inbound_tunnel_port']}, first uid/gid {cfg['first_uid']}/{cfg['first_gid']}, flags 0x{cfg['flags']:x}",
             f"  entries: " + ", ".join(f"{k}={v}" for k, v in report["entries"].items()),
             f"  links ({report['pins']}):"]
    for name, info in sorted(report["links"].items()):
        lines.append(f"    {name}: link {info['id']} prog {info['prog_id']}"
                     + (f" cgroup {info['cgroup_id']}" if "cgroup_id" in info else ""))
    if "decisions" in report:
        from initagent import counters
        lines += counters.render_pod(report["decisions"])
    return "\n".join(lines)
