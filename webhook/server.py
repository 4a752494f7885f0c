"""Run the Flask app under gunicorn (gthread workers) over TLS >= 1.2.

- TLS: gunicorn's `ssl_context` hook returns our cached context (webhook.certs.
  TlsContextCache), so each new connection sees rotated files without a restart
  and without re-reading them per handshake. `ssl_version` is ignored by gunicorn
  since 21.0; the hook is the supported way to set the minimum version.
- Metrics: PROMETHEUS_MULTIPROC_DIR is set and wiped before the workers fork
  (prometheus-client reads it at import); child_exit marks dead workers.
- gthread (not sync): keep-alive, so the apiserver does not pay a handshake per call.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger as GunicornLogger

from webhook.worker import BalancedThreadWorker, ConnectionTable


GIL_SWITCH_INTERVAL_S = 0.0005


class AccessLogOnDemand(GunicornLogger):
    """gunicorn's logger, but without building the access-log record when no one reads it.

    With any logconfig gunicorn treats the access log as enabled and formats ~40 atoms per request
    (request/response headers, environ, a strftime) before the level check drops the line: ~7% of a
    worker's CPU per admission. `--access-log` still works: the level decides, as before.
    """

    def access(self, resp, req, environ, request_time):
        if self.access_log.isEnabledFor(logging.INFO):
            super().access(resp, req, environ, request_time)


@dataclass
class ServerOptions:
    host: str = "0.0.0.0"
    port: int = 8443
    cert_dir: str = "run/certs"
    agent_image: str = ""
    accepted_agent_images: tuple[str, ...] = ()   # besides agent_image (rolling upgrades)
    accepted_istio_images: tuple[str, ...] = ()   # opt-in: Istio's capture containers' images (empty: unchecked)
    mesh_privileged_proxies: bool = False         # opt-in: Istio's privileged istio-init/istio-proxy shape is exempt
    namespace: str = "bpfinit-system"   # the webhook's own namespace: its pods are never mutated/policed
    node_namespace: str = "bpfinit-node"   # the exporter/gc DaemonSet's namespace: never mutated/policed either
    workers: int = 2
    threads: int = 16
    metrics_dir: str | None = None
    log_level: str = "info"
    access_log: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def prepare_metrics_dir(path: str | None) -> tuple[str, bool]:
    """Empty (or create) the multiprocess dir; returns (path, created_by_us)."""
    created = path is None
    if path is None:
        path = tempfile.mkdtemp(prefix="bpfinit-webhook-metrics-")
    else:
        os.makedirs(path, exist_ok=True)
        # Stale files from a previous run would be summed into this run's counters.
        for entry in os.scandir(path):
            if entry.is_file() and entry.name.endswith(".db"):
                os.unlink(entry.path)
    from webhook import metrics
    metrics.enable_multiprocess(path)
    return path, created


class WebhookServer(BaseApplication):
    def __init__(self, options: ServerOptions, policy_store: Any = None):
        self.options = options
        self.policy_store = policy_store
        super().__init__()

    def load_config(self) -> None:
        from webhook import certs, metrics  # after PROMETHEUS_MULTIPROC_DIR is set

        tls_cache = certs.TlsContextCache(self.options.cert_dir)
        tls_cache.context()  # fail at start-up, not at the first handshake

        def ssl_context(_conf, _default_factory):
            return tls_cache.context()

        # Shared by the workers forked from here (webhook/worker.py); spare slots for replaced workers.
        connection_table = ConnectionTable(slots=2 * max(1, self.options.workers) + 2)
        BalancedThreadWorker.table = connection_table

        def child_exit(_server, worker):
            metrics.mark_worker_dead(worker.pid)
            connection_table.release(worker.pid)

        def post_fork(_server, _worker):
            # gthread hands each request from the poller thread to a pool thread; with CPython's
            # default 5 ms GIL switch interval a ready thread can wait a whole interval behind a
            # busy one, which shows up directly in admission p99.
            sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)

        paths = certs.CertPaths(Path(self.options.cert_dir))
        settings = {
            "bind": [_bind_address(self.options.host, self.options.port)],
            "workers": self.options.workers,
            # gthread, steering new connections to the least-loaded worker (webhook/worker.py).
            "worker_class": BalancedThreadWorker,
            "threads": self.options.threads,
            "certfile": str(paths.tls_cert),
            "keyfile": str(paths.tls_key),
            "ssl_context": ssl_context,
            "child_exit": child_exit,
            "post_fork": post_fork,
            "keepalive": 75,          # longer than the apiserver's idle connection reuse
            "timeout": 30,
            "graceful_timeout": 10,
            "loglevel": self.options.log_level,
            "errorlog": "-",
            # gunicorn's own lines (worker boot/exit, errors) in the same JSON format as ours.
            "logconfig_dict": _gunicorn_log_config(self.options.log_level, self.options.access_log),
            "logger_class": AccessLogOnDemand,
            "proc_name": "bpfinit-webhook",
            # gunicorn >= 24 opens a control socket in $HOME by default; several servers
            # (tests, replicas on one host) would fight over it and we do not use it.
            "control_socket_disable": True,
            **self.options.extra,
        }
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self):
        from webhook import logs
        from webhook.app import WebhookSettings, create_app

        logs.configure(self.options.log_level)
        return create_app(WebhookSettings(agent_image=self.options.agent_image, cert_dir=self.options.cert_dir,
                                          own_namespace=self.options.namespace,
                                          node_namespace=self.options.node_namespace,
                                          accepted_agent_images=tuple(self.options.accepted_agent_images),
                                          accepted_istio_images=tuple(self.options.accepted_istio_images),
                                          mesh_privileged_proxies=bool(self.options.mesh_privileged_proxies)),
                          policy_store=self.policy_store)


def _gunicorn_log_config(level: str, access_log: bool) -> dict:
    # gunicorn shallow-merges this over its defaults, so the handler names it expects must exist.
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "root": {"level": "WARNING", "handlers": ["console"]},
        "formatters": {"json": {"()": "webhook.logs.JsonFormatter"}},
        "filters": {"quiet_idle": {"()": "webhook.logs.QuietIdleTimeouts"}},
        "handlers": {"console": dict(handler), "error_console": {**handler, "filters": ["quiet_idle"]}},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "handlers": ["error_console"], "propagate": False,
                               "qualname": "gunicorn.error"},
            # With a logconfig gunicorn always emits access lines (at INFO): the level switches them off.
            "gunicorn.access": {"level": "INFO" if access_log else "WARNING", "handlers": ["console"],
                                "propagate": False,
                                "qualname": "gunicorn.access"},
        },
    }


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serve(options: ServerOptions, policy_store: Any = None) -> int:
    metrics_dir, created = prepare_metrics_dir(options.metrics_dir)
    try:
        WebhookServer(options, policy_store).run()
    finally:
        if created:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0

