"""TLS of the real server: SANs checked by a verifying client, TLS < 1.2 refused, hot rotation, readiness."""
from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from tests.webhook.conftest import WEBHOOK_BIN, start_server
from webhook import certs

SERVICE_NAME = "bpfinit-webhook.bpfinit-system.svc"


def client_context(ca_file: str, minimum=None, maximum=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    if minimum or maximum:
        # Let the *client* offer old protocols, so that a refusal can only come from the server.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        if minimum:
            context.minimum_version = minimum
        if maximum:
            context.maximum_version = maximum
    return context


def handshake(port: int, context: ssl.SSLContext, server_hostname: str) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        return context.wrap_socket(raw, server_hostname=server_hostname)
    except BaseException:
        raw.close()
        raise


def peer_serial(tls: ssl.SSLSocket) -> int:
    return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def http_get(tls: ssl.SSLSocket, path: str) -> bytes:
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    deadline = time.monotonic() + 10
    while b"\r\n\r\n" not in data and time.monotonic() < deadline:
        chunk = tls.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length and time.monotonic() < deadline:
        body += tls.recv(65536)
    return head.split(b"\r\n")[0] + b" " + body


@pytest.fixture
def own_server(tmp_path):
    server = start_server(tmp_path, workers=1)
    yield server
    server.stop()


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost", SERVICE_NAME, SERVICE_NAME + ".cluster.local",
                                  "bpfinit-webhook.bpfinit-system"])
def test_self_made_certificate_carries_the_service_sans(webhook_server, name):
    with handshake(webhook_server.port, client_context(webhook_server.ca), name) as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize("name", ["other.bpfinit-system.svc", "bpfinit-webhook.default.svc", "example.com"])
def test_wrong_san_is_refused_by_a_verifying_client(webhook_server, name):
    with pytest.raises(ssl.SSLCertVerificationError, match="match|mismatch"):
        handshake(webhook_server.port, client_context(webhook_server.ca), name)


def test_untrusted_ca_is_refused(webhook_server):
    other_ca = trustme.CA()
    context = ssl.create_default_context()
    other_ca.configure_trust(context)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(webhook_server.port, context, "127.0.0.1")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_tls_1_1_and_1_0_are_refused_but_1_2_and_1_3_work(webhook_server):
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = client_context(webhook_server.ca, minimum=ssl.TLSVersion.TLSv1, maximum=version)
        with handshake(webhook_server.port, context, "127.0.0.1") as tls:
            assert tls.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    for version in (ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1):
        context = client_context(webhook_server.ca, minimum=ssl.TLSVersion.TLSv1, maximum=version)
        # The server's alert, not a local client refusal: the client above was allowed to offer it.
        with pytest.raises(ssl.SSLError, match="(?i)alert protocol version"):
            handshake(webhook_server.port, context, "127.0.0.1")


def test_rotation_is_seen_by_new_connections_without_restart(own_server):
    context = client_context(own_server.ca)
    pid = own_server.process.pid
    old = handshake(own_server.port, context, "127.0.0.1")
    old_serial = peer_serial(old)
    assert http_get(old, "/healthz").startswith(b"HTTP/1.1 200")

    rotated = certs.rotate_serving_certificate(own_server.cert_dir, certs.default_sans("bpfinit-webhook", "bpfinit-system"))
    assert rotated.serial_number != old_serial
    with handshake(own_server.port, context, "127.0.0.1") as new:
        assert peer_serial(new) == rotated.serial_number
        assert http_get(new, "/readyz").startswith(b"HTTP/1.1 200")
    # The established keep-alive connection keeps working; the server never restarted.
    assert http_get(old, "/healthz").startswith(b"HTTP/1.1 200")
    old.close()
    assert own_server.process.poll() is None and own_server.process.pid == pid


def test_broken_files_mid_rotation_keep_serving_and_readyz_says_so(own_server):
    context = client_context(own_server.ca)
    with handshake(own_server.port, context, "127.0.0.1") as first:
        serial = peer_serial(first)
    good_cert = (own_server.cert_dir / "tls.crt").read_bytes()
    # A new key without its certificate yet: the pair does not match.
    cert, key = certs.issue_serving_cert(*certs._load_ca(certs.CertPaths(own_server.cert_dir)), ["127.0.0.1"])
    certs._write_atomically(own_server.cert_dir / "tls.crt", b"-----BEGIN CERTIFICATE-----\ngarbage\n", 0o644)
    with handshake(own_server.port, context, "127.0.0.1") as during:
        assert peer_serial(during) == serial           # previous context still serves
        assert b"503" in http_get(during, "/readyz").split(b" ")[1]
    (own_server.cert_dir / "tls.crt").write_bytes(good_cert)
    with handshake(own_server.port, context, "127.0.0.1") as after:
        assert http_get(after, "/readyz").startswith(b"HTTP/1.1 200")
    assert cert and key


def test_certificates_from_a_secret_are_used_as_is(tmp_path):
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "bpfinit-webhook.elsewhere.svc")
    cert_dir = tmp_path / "secret"
    cert_dir.mkdir()
    leaf.cert_chain_pems[0].write_to_path(str(cert_dir / "tls.crt"))
    leaf.private_key_pem.write_to_path(str(cert_dir / "tls.key"))
    ca.cert_pem.write_to_path(str(cert_dir / "ca.crt"))
    before = (cert_dir / "tls.crt").read_bytes()
    server = start_server(tmp_path, workers=1, cert_dir=cert_dir)
    try:
        with handshake(server.port, client_context(str(cert_dir / "ca.crt")), "bpfinit-webhook.elsewhere.svc") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert (cert_dir / "tls.crt").read_bytes() == before and not (cert_dir / "ca.key").exists()
    finally:
        server.stop()


def test_self_made_certificate_shape(tmp_path):
    paths = certs.ensure_certificates(tmp_path / "c", certs.default_sans("wh", "ns"))
    leaf = x509.load_pem_x509_certificate(paths.tls_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "wh.ns.svc", "wh.ns.svc.cluster.local"} <= set(sans.get_values_for_type(x509.DNSName))
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    leaf.verify_directly_issued_by(ca)
    assert oct(paths.tls_key.stat().st_mode & 0o777) == "0o600"
    # A second call keeps what exists (no silent re-issue that would break a caBundle).
    again = certs.ensure_certificates(tmp_path / "c", ["other"])
    assert again.tls_cert.read_bytes() == paths.tls_cert.read_bytes()


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(WEBHOOK_BIN), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_cli_cert_dir_problems_are_one_clear_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli("serve", "--cert-dir", str(blocker / "certs"), "--port", "1", cwd=tmp_path)
    assert result.returncode == 2 and "cannot create cert dir" in result.stderr and "Traceback" not in result.stderr
    half = tmp_path / "half"
    half.mkdir()
    (half / "tls.crt").write_text("x")
    result = run_cli("serve", "--cert-dir", str(half), "--port", "1", cwd=tmp_path)
    assert result.returncode == 2 and "only one of tls.crt/tls.key" in result.stderr


def test_cli_bad_flag_values_are_usage_errors(tmp_path):
    for args in (["serve", "--port", "99999"], ["serve", "--workers", "0"], ["serve", "--port", "abc"], ["bogus"]):
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 2 and "usage:" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("serve", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "--agent-image" in result.stdout and "--cert-dir" in result.stdout
    assert sys.executable


def test_idle_tls_connections_cannot_starve_the_worker(tmp_path):
    """Connections that handshake and then send nothing (Go clients keep spare ones) must not hold all of
    gthread's threads: the server closes them after FIRST_REQUEST_TIMEOUT_S and keeps answering."""
    server = start_server(tmp_path, "--threads", "2", workers=1)
    context = client_context(server.ca)
    closed_by_server: list[bool] = []

    def idle_client() -> None:
        # Like Go's idle connection: handshake, never send, notice the server's close and close too.
        try:
            with handshake(server.port, context, "127.0.0.1") as tls:
                tls.settimeout(30)
                closed_by_server.append(tls.recv(1) == b"")
        except (ssl.SSLError, OSError):
            closed_by_server.append(True)

    idle = [threading.Thread(target=idle_client) for _ in range(6)]   # three times the thread count
    try:
        started = time.monotonic()
        for thread in idle:
            thread.start()
        time.sleep(0.2)
        with handshake(server.port, context, "127.0.0.1") as busy:
            assert http_get(busy, "/healthz").startswith(b"HTTP/1.1 200")
        # Each idle connection holds a thread for about FIRST_REQUEST_TIMEOUT_S (6 idle / 2 threads),
        # plus slack for a loaded machine; without the guard this request never gets a thread.
        assert time.monotonic() - started < certs.FIRST_REQUEST_TIMEOUT_S * (6 / 2 + 1) + 4
        for thread in idle:
            thread.join(timeout=30)
        assert closed_by_server == [True] * 6
        assert not [line for line in server.log_lines() if line.get("level") == "error"]
    finally:
        server.stop()
