"""Serving certificates: a self-made CA + leaf with `cryptography`, and hot reload.

Layout of a cert dir (the same names as a kubernetes.io/tls Secret plus ca.crt):
  ca.crt, ca.key    the CA (kept so that every re-issue chains to the same caBundle)
  tls.crt, tls.key  the serving certificate and key

`ensure_certificates()` creates what is missing and never overwrites an existing
tls.crt/tls.key (they may come from a mounted Secret / cert-manager).
`TlsContextCache` hands gunicorn an SSLContext per accepted connection, rebuilt
only when the files change on disk: rotation is seen by the next new connection,
without a restart and without re-reading the files on every handshake.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY, TLS_CERT, TLS_KEY = "ca.crt", "ca.key", "tls.crt", "tls.key"
CA_DAYS = 3650
LEAF_DAYS = 365
BACKDATE = dt.timedelta(hours=1)  # tolerate clock skew between nodes (cert-controller convention)


class CertificateError(Exception):
    """A certificate problem explained in one line (no traceback for users)."""


@dataclass(frozen=True)
class CertPaths:
    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.directory / CA_KEY

    @property
    def tls_cert(self) -> Path:
        return self.directory / TLS_CERT

    @property
    def tls_key(self) -> Path:
        return self.directory / TLS_KEY


def service_dns_names(service: str, namespace: str) -> list[str]:
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
            f"{service}.{namespace}.svc.cluster.local"]


def default_sans(service: str, namespace: str) -> list[str]:
    return ["localhost", "127.0.0.1", "::1", *service_dns_names(service, namespace)]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: accepted by the apiserver's Go TLS stack and cheaper per handshake than RSA.
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(common_name: str = "bpfinit-webhook-ca", days: int = CA_DAYS):
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _san_entries(sans: list[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for san in dict.fromkeys(sans):  # de-duplicate, keep order
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            entries.append(x509.DNSName(san))
    return entries


def issue_serving_cert(ca_cert: x509.Certificate, ca_key, sans: list[str], days: int = LEAF_DAYS):
    """A server-auth leaf whose identity is ONLY in the SANs (CN is ignored since Go 1.15)."""
    if not sans:
        raise CertificateError("a serving certificate needs at least one SAN")
    key = _new_key()
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0][:64])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(_san_entries(sans)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    # rename() is atomic: a reader sees the old file or the new one, never half of one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_serving_pair(paths: CertPaths, cert: x509.Certificate, key) -> None:
    _write_atomically(paths.tls_key, _key_pem(key), 0o600)
    _write_atomically(paths.tls_cert, _cert_pem(cert), 0o644)


def _load_ca(paths: CertPaths):
    try:
        cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CertificateError(f"cannot load the CA from {paths.directory}: {exc}") from None
    return cert, key


def _prepare_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise CertificateError(f"cannot create cert dir {directory}: {exc.strerror}") from None
    if not os.access(directory, os.W_OK):
        raise CertificateError(f"cert dir {directory} has no {TLS_CERT}/{TLS_KEY} and is not writable")


def ensure_certificates(directory: str | os.PathLike, sans: list[str]) -> CertPaths:
    """Use tls.crt/tls.key if both exist; otherwise create them (and the CA if missing)."""
    paths = CertPaths(Path(directory))
    has_cert, has_key = paths.tls_cert.exists(), paths.tls_key.exists()
    if has_cert and has_key:
        return paths
    if has_cert != has_key:
        raise CertificateError(f"{paths.directory} holds only one of {TLS_CERT}/{TLS_KEY}; provide both or neither")
    _prepare_dir(paths.directory)
    if paths.ca_cert.exists() and paths.ca_key.exists():
        ca_cert, ca_key = _load_ca(paths)
    else:
        ca_cert, ca_key = make_ca()
        _write_atomically(paths.ca_key, _key_pem(ca_key), 0o600)
        _write_atomically(paths.ca_cert, _cert_pem(ca_cert), 0o644)
    cert, key = issue_serving_cert(ca_cert, ca_key, sans)
    write_serving_pair(paths, cert, key)
    return paths


def rotate_serving_certificate(directory: str | os.PathLike, sans: list[str], days: int = LEAF_DAYS) -> x509.Certificate:
    """Issue a fresh leaf from the dir's CA and swap it in (what a renewal does)."""
    paths = CertPaths(Path(directory))
    ca_cert, ca_key = _load_ca(paths)
    cert, key = issue_serving_cert(ca_cert, ca_key, sans, days)
    write_serving_pair(paths, cert, key)
    return cert


def _fingerprint(paths: CertPaths) -> tuple:
    stats = []
    for path in (paths.tls_cert, paths.tls_key):
        st = os.stat(path)  # follows symlinks: a Secret volume swaps ..data atomically
        stats.append((st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size))
    return tuple(stats)


# A connection that completes the TLS handshake but sends no request would hold one of
# gunicorn's gthread threads in a blocking read (gthread parks only *keep-alive* connections
# in its poller, a new one is read by a pool thread). Go clients, the apiserver included,
# open such spare connections (dial races, idle pools); in the benchmark a few of them stalled
# whole workers. So: the handshake and every read have a timeout, and the wait for the first
# request byte after the handshake is short. A timed-out socket is closed and its thread freed
# (Go clients transparently retry a request on a server-closed idle connection).
READ_TIMEOUT_S = 10.0
FIRST_REQUEST_TIMEOUT_S = 1.0


class _FirstRequestGuardedSocket(ssl.SSLSocket):
    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        if getattr(self, "_first_read_done", False):
            return super().recv(buflen, flags)
        self._first_read_done = True
        if self.pending():
            return super().recv(buflen, flags)
        previous = self.gettimeout()
        self.settimeout(FIRST_REQUEST_TIMEOUT_S)
        try:
            return super().recv(buflen, flags)
        except TimeoutError:
            # Shut both directions now: gunicorn then closes the socket without its graceful
            # linger, which waits for the peer on the worker's main (poller) thread.
            try:
                socket.socket.shutdown(self, socket.SHUT_RDWR)
            except OSError:
                pass
            raise
        finally:
            if self.fileno() != -1:
                self.settimeout(previous)


class _GuardedContext(ssl.SSLContext):
    sslsocket_class = _FirstRequestGuardedSocket

    def wrap_socket(self, sock, *args, **kwargs):
        # gunicorn sets the socket back to plain blocking before each keep-alive request; those
        # come from its poller with data ready, so only a new connection needs the guard.
        sock.settimeout(READ_TIMEOUT_S)
        return super().wrap_socket(sock, *args, **kwargs)


def build_server_context(paths: CertPaths) -> ssl.SSLContext:
    context = _GuardedContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.0/1.1 are refused
    context.load_cert_chain(certfile=str(paths.tls_cert), keyfile=str(paths.tls_key))
    return context


class TlsContextCache:
    """Per-process cache of the server SSLContext, rebuilt when tls.crt/tls.key change.

    During a rotation the two files are replaced one after the other; if the pair
    does not match at that instant, the previous context keeps serving and the
    next connection tries again.
    """

    def __init__(self, directory: str | os.PathLike):
        self.paths = CertPaths(Path(directory))
        self._lock = threading.Lock()
        self._fingerprint: tuple | None = None
        self._context: ssl.SSLContext | None = None
        self.last_error: str | None = None

    def context(self) -> ssl.SSLContext:
        try:
            fingerprint = _fingerprint(self.paths)
        except OSError as exc:
            return self._fallback(f"cannot stat certificate files: {exc.strerror}")
        if fingerprint == self._fingerprint and self._context is not None:
            return self._context
        with self._lock:
            if fingerprint != self._fingerprint or self._context is None:
                try:
                    self._context = build_server_context(self.paths)
                    self._fingerprint = fingerprint
                    self.last_error = None
                except (OSError, ssl.SSLError, ValueError) as exc:
                    return self._fallback(f"cannot load {self.paths.tls_cert}: {exc}")
            return self._context

    def _fallback(self, error: str) -> ssl.SSLContext:
        self.last_error = error
        if self._context is None:
            raise CertificateError(error)
        return self._context


def certificate_status(directory: str | os.PathLike) -> tuple[bool, str]:
    """(ready, reason) for /readyz: both files load as a matching pair and the cert is in date."""
    paths = CertPaths(Path(directory))
    try:
        cert = x509.load_pem_x509_certificate(paths.tls_cert.read_bytes())
        build_server_context(paths)
    except (OSError, ValueError, ssl.SSLError) as exc:
        return False, f"certificate not loadable: {exc}"
    now = _now()
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        return False, f"certificate not valid now (valid {cert.not_valid_before_utc} .. {cert.not_valid_after_utc})"
    return True, "certificates loaded"
