"""`bpfinit-webhook` command line.

    bpfinit-webhook serve [--host H] [--port P] [--cert-dir DIR] [--agent-image IMG] ...

Other subcommands (`manifests`, `audit`, ...) plug in by adding a
`register(subparsers)` function to their module and its name to SUBCOMMAND_MODULES;
`register` adds a parser whose `func(args) -> int` is called. A module listed
here that does not exist yet is skipped.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

DEFAULT_PORT = 8443
DEFAULT_CERT_DIR = "run/certs"           # relative to the working directory: writable by the user
DEFAULT_SERVICE = "bpfinit-webhook"
DEFAULT_NAMESPACE = "bpfinit-system"
DEFAULT_NODE_NAMESPACE = "bpfinit-node"

# Modules that add subcommands (each with `register(subparsers)`).
SUBCOMMAND_MODULES = ("webhook.manifests_cli", "webhook.audit", "webhook.cabundle")


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port")
    return value


def split_images(values: list[str]) -> tuple[str, ...]:
    """`--accepted-agent-images` / `--accepted-istio-images` values (each comma-separated) as one list,
    blanks and repeats dropped."""
    out: list[str] = []
    for value in values or []:
        for image in (value or "").split(","):
            image = image.strip()
            if image and image not in out:
                out.append(image)
    return tuple(out)


def check_istio_images(entries: tuple[str, ...], flag: str = "--accepted-istio-images") -> None:
    """ValueError naming the first entry that can never match what it looks like (e.g. `istio/*`)."""
    from webhook.mutate import istio_image_entry_problem

    for entry in entries:
        problem = istio_image_entry_problem(entry)
        if problem:
            raise ValueError(f"{flag} entry {entry!r} {problem}")


MESH_PRIVILEGED_PROXIES_ENV = "BPFINIT_MESH_PRIVILEGED_PROXIES"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def add_mesh_privileged_proxies(parser, help_text: str) -> None:
    """`--mesh-privileged-proxies` (a switch; its default is the env, read by `mesh_privileged_proxies`)."""
    parser.add_argument("--mesh-privileged-proxies", action="store_const", const="true",
                        default=os.environ.get(MESH_PRIVILEGED_PROXIES_ENV, ""), help=help_text)


def mesh_privileged_proxies(value: str) -> bool:
    """The `--mesh-privileged-proxies` / BPFINIT_MESH_PRIVILEGED_PROXIES value as a boolean; ValueError (one
    line) for anything but 1/true/yes/on or 0/false/no/off/empty (any case)."""
    word = (value or "").strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ValueError(f"{MESH_PRIVILEGED_PROXIES_ENV}={value!r} is not a boolean "
                     "(true/false, 1/0, yes/no, on/off)")


def capture_trust_settings(args) -> tuple[tuple[str, ...], bool]:
    """--accepted-istio-images and --mesh-privileged-proxies of `serve` or `audit`, checked; ValueError
    (one line) names a bad value."""
    istio_images = split_images(args.accepted_istio_images)
    check_istio_images(istio_images)
    return istio_images, mesh_privileged_proxies(args.mesh_privileged_proxies)


def privileged_without_images_warning(privileged: bool, istio_images: tuple[str, ...]) -> str | None:
    """The start-up warning when privileged proxies are exempt but Istio's images are not checked."""
    if not privileged or istio_images:
        return None
    return ("warning: --mesh-privileged-proxies is on without --accepted-istio-images: any container named "
            "istio-init or istio-proxy with Istio's privileged shape is exempt whatever its image")


def _add_serve(subparsers) -> None:
    from webhook import policy
    from webhook.mutate import DEFAULT_AGENT_IMAGE

    serve = subparsers.add_parser(
        "serve", help="run the admission webhook server (HTTPS)",
        description="Serve /mutate, /validate, /healthz, /readyz and /metrics over TLS >= 1.2 with gunicorn. "
                    "Every flag also reads the environment variable shown.")
    serve.add_argument("--host", default=_env("BPFINIT_WEBHOOK_HOST", "0.0.0.0"),
                       help="address to listen on (env BPFINIT_WEBHOOK_HOST; default %(default)s)")
    serve.add_argument("--port", type=_port, default=_env("BPFINIT_WEBHOOK_PORT", str(DEFAULT_PORT)),
                       help="TCP port (env BPFINIT_WEBHOOK_PORT; default %(default)s)")
    serve.add_argument("--cert-dir", default=_env("BPFINIT_WEBHOOK_CERT_DIR", DEFAULT_CERT_DIR),
                       help="directory with tls.crt/tls.key (and ca.crt); created with a self-made CA when "
                            "they are missing (env BPFINIT_WEBHOOK_CERT_DIR; default %(default)s)")
    serve.add_argument("--agent-image", default=_env("BPFINIT_AGENT_IMAGE", DEFAULT_AGENT_IMAGE),
                       help="image of the bpfinit agent put in place of istio-init "
                            "(env BPFINIT_AGENT_IMAGE; default %(default)s)")
    serve.add_argument("--accepted-agent-images", metavar="IMG[,IMG...]", action="append",
                       default=[_env("BPFINIT_ACCEPTED_AGENT_IMAGES", "")],
                       help="more images a container running bpfinit-agent may carry and still count as the "
                            "webhook's own, e.g. the previous --agent-image during a rolling upgrade; comma-"
                            "separated, repeatable; --agent-image is always accepted, any other image running "
                            "bpfinit-agent is refused (env BPFINIT_ACCEPTED_AGENT_IMAGES; default: none)")
    serve.add_argument("--accepted-istio-images", metavar="IMG[,IMG...]", action="append",
                       default=[_env("BPFINIT_ACCEPTED_ISTIO_IMAGES", "")],
                       help="opt-in: the images Istio's istio-init, istio-validation and istio-proxy may carry, "
                            "an exact reference or REPOSITORY:* (any tag or digest of that repository), comma-"
                            "separated, repeatable; a capture container with another image loses its exemptions "
                            "and an istio-init with another image is not swapped but refused (env "
                            "BPFINIT_ACCEPTED_ISTIO_IMAGES; default: none, Istio's images are not checked)")
    add_mesh_privileged_proxies(
        serve, "opt-in: the mesh sets Istio's values.global.proxy.privileged, so an istio-init / istio-proxy with "
               "exactly that rendering (privileged: true and allowPrivilegeEscalation: true, nothing more than "
               "the template grants) is exempt instead of unverifiable; combine it with --accepted-istio-images "
               f"(env {MESH_PRIVILEGED_PROXIES_ENV}=true; default: off)")
    serve.add_argument("--service-name", default=_env("BPFINIT_WEBHOOK_SERVICE", DEFAULT_SERVICE),
                       help="Service name for the certificate SANs (default %(default)s)")
    serve.add_argument("--namespace", default=_env("BPFINIT_WEBHOOK_NAMESPACE", DEFAULT_NAMESPACE),
                       help="the webhook's own namespace: certificate SANs <svc>.<ns>.svc, and its pods (like "
                            "kube-system's) are never mutated or policed (env BPFINIT_WEBHOOK_NAMESPACE; "
                            "default %(default)s)")
    serve.add_argument("--node-namespace", default=_env("BPFINIT_NODE_NAMESPACE", DEFAULT_NODE_NAMESPACE),
                       help="the exporter/gc DaemonSet's namespace: its pods are never mutated or policed either "
                            "(env BPFINIT_NODE_NAMESPACE; default %(default)s)")
    serve.add_argument("--extra-san", action="append", default=[],
                       help="additional DNS name or IP for a self-made certificate (repeatable)")
    serve.add_argument("--workers", type=_positive_int, default=_env("BPFINIT_WEBHOOK_WORKERS", "2"),
                       help="gunicorn worker processes (default %(default)s)")
    serve.add_argument("--threads", type=_positive_int, default=_env("BPFINIT_WEBHOOK_THREADS", "16"),
                       help="threads per worker (gthread; default %(default)s)")
    serve.add_argument("--metrics-dir", default=os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
                       help="prometheus multiprocess directory, wiped at start "
                            "(env PROMETHEUS_MULTIPROC_DIR; default: a fresh temporary directory)")
    serve.add_argument("--log-level", default=_env("BPFINIT_WEBHOOK_LOG_LEVEL", "info"),
                       choices=["debug", "info", "warning", "error"], help="default %(default)s")
    serve.add_argument("--access-log", action="store_true", help="also write gunicorn's access log")
    policy.add_serve_arguments(serve)  # --policy FILE, --policy-crds
    serve.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from webhook import certs, policy
    from webhook.server import ServerOptions, serve

    try:
        policy_store = policy.store_from_args(args)
    except policy.PolicyError as error:
        print(f"bpfinit-webhook: {error}", file=sys.stderr)
        return 2
    try:
        istio_images, privileged = capture_trust_settings(args)
    except ValueError as error:
        print(f"bpfinit-webhook: {error}", file=sys.stderr)
        return 2
    sans = certs.default_sans(args.service_name, args.namespace) + list(args.extra_san)
    try:
        paths = certs.ensure_certificates(args.cert_dir, sans)
    except certs.CertificateError as error:
        print(f"bpfinit-webhook: {error}", file=sys.stderr)
        return 2
    print(f"bpfinit-webhook: serving https://{args.host}:{args.port} with {paths.tls_cert} "
          f"(CA bundle: {paths.ca_cert})", file=sys.stderr)
    warning = privileged_without_images_warning(privileged, istio_images)
    if warning:
        print(f"bpfinit-webhook: {warning}", file=sys.stderr)
    options = ServerOptions(host=args.host, port=args.port, cert_dir=str(paths.directory),
                            agent_image=args.agent_image,
                            accepted_agent_images=split_images(args.accepted_agent_images),
                            accepted_istio_images=istio_images, mesh_privileged_proxies=privileged,
                            namespace=args.namespace, node_namespace=args.node_namespace,
                            workers=args.workers,
                            threads=args.threads,
                            metrics_dir=args.metrics_dir, log_level=args.log_level, access_log=args.access_log)
    try:
        return serve(options, policy_store)
    except certs.CertificateError as error:
        print(f"bpfinit-webhook: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bpfinit-webhook",
                                     description="bpfinit admission webhook (swaps istio-init for the eBPF agent)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    _add_serve(subparsers)
    for module_name in SUBCOMMAND_MODULES:
        if importlib.util.find_spec(module_name) is not None:
            importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
