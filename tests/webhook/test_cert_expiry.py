"""The serving certificate's expiry in /metrics, and /readyz failing once it has expired (real server)."""
from __future__ import annotations

import datetime as dt
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.webhook.conftest import start_server
from tests.webhook.test_metrics import samples, value
from tests.webhook.test_tls import handshake, http_get
from webhook import certs

GAUGE = "bpfinit_webhook_certificate_expiry_timestamp_seconds"


def _not_after(cert_dir) -> float:
    return x509.load_pem_x509_certificate((cert_dir / "tls.crt").read_bytes()).not_valid_after_utc.timestamp()


def _install_expired_pair(cert_dir) -> x509.Certificate:
    """A serving pair from the dir's own CA that expired yesterday (what a stalled renewal leaves behind)."""
    ca_cert, ca_key = certs._load_ca(certs.CertPaths(cert_dir))
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=30)).not_valid_after(now - dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    certs.write_serving_pair(certs.CertPaths(cert_dir), cert, key)
    return cert


def _unverified_context() -> ssl.SSLContext:
    # The point is to reach a server whose certificate has expired: loopback, our own test server.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def test_expiry_gauge_matches_the_served_certificate(webhook_server):
    found = samples(webhook_server)
    assert value(found, GAUGE) == _not_after(webhook_server.cert_dir)
    assert value(found, GAUGE) > dt.datetime.now(dt.timezone.utc).timestamp() + 300 * 86400   # a fresh 1-year cert


def test_expired_certificate_fails_readyz_and_shows_in_the_gauge(tmp_path):
    server = start_server(tmp_path, workers=1)
    try:
        good_cert = (server.cert_dir / "tls.crt").read_bytes()
        good_key = (server.cert_dir / "tls.key").read_bytes()
        expired = _install_expired_pair(server.cert_dir)
        with handshake(server.port, _unverified_context(), "127.0.0.1") as tls:
            answer = http_get(tls, "/readyz")
        assert answer.startswith(b"HTTP/1.1 503") and b"not valid now" in answer
        with handshake(server.port, _unverified_context(), "127.0.0.1") as tls:
            metrics_text = http_get(tls, "/metrics").decode()
        line = [ln for ln in metrics_text.splitlines() if ln.startswith(GAUGE + " ")][0]
        assert float(line.split()[1]) == expired.not_valid_after_utc.timestamp()
        assert float(line.split()[1]) < dt.datetime.now(dt.timezone.utc).timestamp()
        # Renewed: ready again, gauge back in the future.
        certs._write_atomically(server.cert_dir / "tls.key", good_key, 0o600)
        certs._write_atomically(server.cert_dir / "tls.crt", good_cert, 0o644)
        assert server.get("/readyz").status_code == 200
        assert value(samples(server), GAUGE) == _not_after(server.cert_dir)
    finally:
        server.stop()
