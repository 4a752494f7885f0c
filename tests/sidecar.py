"""HAProxy as a stand-in Istio sidecar inside a tests.podenv pod: one helper for tests, bench and the demo.

The sidecar's outbound listener is 127.0.0.1:<-p>; with `server orig 0.0.0.0` HAProxy connects to the
client's original destination, which it reads with SO_ORIGINAL_DST (answered by bpfinit's getsockopt
program, or by conntrack under iptables). The optional inbound listener <-z> forwards to the original
destination from the passthrough source 127.0.0.6, as Envoy does.

    from tests.sidecar import HAProxy, sidecar_config
    with HAProxy(pod, sidecar_config(inbound_port=15006, http=True, stamp_headers=True)) as proxy:
        ...   # started as the proxy uid, listeners up; stopped and its files removed on exit

Readiness is read with `ss` in the pod, never by connecting: a probe connection would itself be
captured and show up in the counters that tests assert exactly.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

PROXY_UID = 1337


def sidecar_config(proxy_port: int = 15001, inbound_port: int | None = None, *, http: bool = False,
                   stamp_headers: bool = False, outbound_server: str = "0.0.0.0",
                   inbound_server: str = "0.0.0.0", inbound_source: str | None = "127.0.0.6",
                   inbound_ipv6: bool = True, reuse_upstream: bool = False, maxconn: int = 4000) -> str:
    """HAProxy config text. `outbound_server`/`inbound_server` "0.0.0.0" = the original destination;
    an explicit address makes the explicitly-addressed "floor" used by bench/datapath.py. With
    `stamp_headers` (http only) each hop writes the destination it saw into X-Out-/X-In-Orig-Dst.
    `reuse_upstream` (http) lets HAProxy share upstream connections between clients (its default);
    off, each client connection gets its own upstream one, as a sidecar's original-destination cluster."""
    mode = "http" if http else "tcp"
    lines = ["global", f"    maxconn {maxconn}", "    nbthread 1",
             "defaults", f"    mode {mode}"]
    if http:
        lines.append("    option http-keep-alive")
    lines += ["    timeout connect 2s", "    timeout client 30s", "    timeout server 30s",
              "frontend outbound", f"    bind 127.0.0.1:{proxy_port}"]
    if stamp_headers:
        lines.append("    http-request set-header X-Out-Orig-Dst %[dst]:%[dst_port]")
    lines += ["    default_backend original_dst_out", "backend original_dst_out"]
    if http and not reuse_upstream:
        lines.append("    http-reuse never")
    lines.append(f"    server orig {outbound_server}")
    if inbound_port is not None:
        lines += ["frontend inbound", f"    bind 0.0.0.0:{inbound_port}"]
        if inbound_ipv6:
            lines.append(f"    bind :::{inbound_port} v6only")
        if stamp_headers:
            lines.append("    http-request set-header X-In-Orig-Dst %[dst]:%[dst_port]")
        lines += ["    default_backend original_dst_in", "backend original_dst_in"]
        if http and not reuse_upstream:
            lines.append("    http-reuse never")
        if inbound_source:
            lines.append(f"    source {inbound_source}")
        lines.append(f"    server orig {inbound_server}")
    return "\n".join(lines) + "\n"


def listening(pod, port: int) -> bool:
    """Something in the pod listens on TCP `port` (read with ss: no connection is made)."""
    return bool(pod.run(["ss", "-Hltn", f"sport = :{port}"]).stdout.strip())


class HAProxy:
    """HAProxy running `config` in `pod` as `uid`/`uid`; `listen` = the TCP ports to wait for."""

    def __init__(self, pod, config: str, *, uid: int = PROXY_UID, listen: tuple[int, ...] | None = None,
                 name: str = "haproxy", timeout: float = 10.0):
        assert shutil.which("haproxy"), "haproxy is missing (scripts/install-system-deps.sh)"
        self.pod, self.config, self.uid, self.name, self.timeout = pod, config, uid, name, timeout
        self.listen = listen if listen is not None else _bound_ports(config)
        self.proc: subprocess.Popen | None = None
        self.dir: Path | None = None

    def start(self) -> "HAProxy":
        self.dir = Path(tempfile.mkdtemp(prefix=f"bpfinit-{self.name}-"))
        self.dir.chmod(0o755)          # the proxy uid must read its config
        cfg = self.dir / self.config_name
        cfg.write_text(self.config_text(self.dir))
        cfg.chmod(0o644)
        # output to a file, not a pipe nobody reads (a full pipe would stall HAProxy)
        with open(self.dir / "haproxy.log", "w") as log:
            self.proc = self.pod.popen(self.command(cfg), uid=self.uid, gid=self.uid,
                                       stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise
        return self

    config_name = "haproxy.cfg"

    def config_text(self, directory: Path) -> str:
        """What goes into the config file in `directory` (a subclass may need paths inside it)."""
        return self.config

    def command(self, cfg: Path) -> list[str]:
        """The foreground command line that runs `cfg` (a subclass may run another server the same way)."""
        return ["haproxy", "-db", "-f", str(cfg)]

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + self.timeout
        waiting = list(self.listen)
        while waiting and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode} before listening: "
                                     f"{self.log()[-2000:]}")
            waiting = [port for port in waiting if not listening(self.pod, port)]
            if waiting:
                time.sleep(0.05)
        if waiting:
            raise AssertionError(f"{self.name}: nothing listening on {waiting} in pod {self.pod.name} after "
                                 f"{self.timeout}s: {self.log()[-2000:]}")

    def log(self) -> str:
        """What HAProxy printed so far."""
        try:
            return (self.dir / "haproxy.log").read_text() if self.dir else ""
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> "HAProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _bound_ports(config: str) -> tuple[int, ...]:
    """The ports of the config's `bind` lines, in order, without repeats."""
    ports = []
    for line in config.splitlines():
        words = line.split()
        if words[:1] == ["bind"] and len(words) > 1:
            port = int(words[1].rsplit(":", 1)[1])
            if port not in ports:
                ports.append(port)
    return tuple(ports)
