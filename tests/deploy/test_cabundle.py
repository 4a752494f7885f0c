"""`bpfinit-webhook certs` (webhook/cabundle.py) against an HTTPS stand-in of the kube-apiserver.

No kube-apiserver can run on this machine, so tests talk to `kube_stub.KubeStub`: a real HTTPS server on
127.0.0.1 with bearer auth serving only the Secret and webhook-configuration endpoints we use, with the
apiserver's create-if-absent (409 AlreadyExists), optimistic-concurrency (409 Conflict) and JSON-patch
(422 on a failed `test`) semantics. The real `kubernetes` client, real certificates and real TLS
handshakes are used throughout.
"""
from __future__ import annotations

import base64
import datetime as dt
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from tests.deploy.kube_stub import KubeStub, write_kubeconfig
from webhook import cabundle, certs, render

REPO = Path(__file__).resolve().parents[2]
NS, SECRET, SVC = "bpfinit-system", "bpfinit-webhook-tls", "bpfinit-webhook"
MUT, VAL = render.MUTATOR_CONFIG, render.VALIDATOR_CONFIG


def _opts():
    return render.RenderOptions()


@pytest.fixture()
def stub(tmp_path):
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    cert_path, ca_path = tmp_path / "stub.pem", tmp_path / "stub-ca.pem"
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    ca.cert_pem.write_to_path(str(ca_path))
    with KubeStub(str(cert_path), str(cert_path)) as kube:
        # The very configurations we ship (rendered), as `kubectl apply` leaves them: no caBundle.
        kube.add_config("mutating", render.mutating_webhook_configuration(_opts()))
        kube.add_config("validating", render.validating_webhook_configuration(_opts()))
        kube.kubeconfig = tmp_path / "kubeconfig"
        write_kubeconfig(kube.kubeconfig, kube.port, str(ca_path))
        yield kube


def _reconciler(kube, out_dir=None, now=None):
    cfg = cabundle.CertsConfig(namespace=NS, secret=SECRET, service=SVC, mutating=(MUT,), validating=(VAL,),
                               out_dir=out_dir, interval_s=0.05, max_backoff_s=0.2)
    kwargs = {"now": now} if now else {}
    return cabundle.CertsReconciler(cfg, cabundle._api_client(str(kube.kubeconfig)), **kwargs)


def _bundles(kube) -> list[bytes]:
    out = []
    for kind, name in (("mutating", MUT), ("validating", VAL)):
        for hook in kube.config(kind, name)["webhooks"]:
            out.append(base64.b64decode(hook["clientConfig"].get("caBundle", "")))
    return out


def _tls_handshake(cert_dir: Path, bundle: bytes, server_name: str) -> x509.Certificate:
    """A real TLS 1.2+ handshake on loopback: server = the written files, client trusts `bundle` only."""
    server_ctx = certs.build_server_context(certs.CertPaths(cert_dir))
    client_ctx = ssl.create_default_context(cadata=bundle.decode())
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    errors = []

    def serve():
        try:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (OSError, ssl.SSLError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=5) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                der = tls.getpeercert(binary_form=True)
                tls.sendall(b"x")
    finally:
        thread.join(timeout=5)
        listener.close()
    return x509.load_der_x509_certificate(der)


def test_first_round_creates_secret_writes_files_and_patches_every_webhook(stub, tmp_path):
    out = tmp_path / "tls"
    out.mkdir()
    result = _reconciler(stub, out).reconcile()
    assert result.secret_action == "created"
    assert sorted(result.patched) == sorted([MUT, VAL])
    secret = stub.secrets[(NS, SECRET)]
    assert secret["type"] == "kubernetes.io/tls"
    data = cabundle.secret_data(secret)
    assert set(data) == set(cabundle.SECRET_KEYS)
    assert (out / "tls.crt").read_bytes() == data["tls.crt"] and not (out / "ca.key").exists()
    assert (out / "tls.key").stat().st_mode & 0o077 == 0
    bundles = _bundles(stub)
    assert len(bundles) == 3 and all(b == data["ca.crt"] for b in bundles)
    # The apiserver dials <svc>.<ns>.svc and trusts only caBundle: the handshake must succeed...
    leaf = _tls_handshake(out, bundles[0], f"{SVC}.{NS}.svc")
    assert leaf.serial_number == x509.load_pem_x509_certificate(data["tls.crt"]).serial_number
    # ...and fail for a name the certificate does not carry (R9).
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(out, bundles[0], "evil.example.svc")


def test_second_round_is_a_no_op(stub, tmp_path):
    rec = _reconciler(stub, tmp_path)
    rec.reconcile()
    writes_before = len(stub.writes())
    result = rec.reconcile()
    assert result.secret_action == "unchanged" and result.patched == [] and not result.files_written
    assert len(stub.writes()) == writes_before


def test_blanked_cabundle_is_repatched(stub, tmp_path):
    """`kubectl apply` of the manifests drops caBundle; the next round puts it back."""
    rec = _reconciler(stub, tmp_path)
    rec.reconcile()
    cfg = stub.configs[("validating", VAL)]
    del cfg["webhooks"][0]["clientConfig"]["caBundle"]
    result = rec.reconcile()
    assert result.patched == [VAL]
    assert len(set(_bundles(stub))) == 1


def test_reordered_webhooks_are_never_patched_at_the_wrong_index(stub, tmp_path):
    """A patch computed from a read is refused (422) if the list was reordered since; the next round fixes it."""
    rec = _reconciler(stub, tmp_path)
    rec.reconcile()
    cfg = stub.configs[("mutating", MUT)]
    cfg["webhooks"][1]["clientConfig"]["caBundle"] = base64.b64encode(b"stale").decode()
    ops = cabundle.ca_bundle_patch(stub.config("mutating", MUT), b"new-bundle")
    assert ops == [{"op": "test", "path": "/webhooks/0/name", "value": cfg["webhooks"][0]["name"]},
                   {"op": "add", "path": "/webhooks/0/clientConfig/caBundle",
                    "value": base64.b64encode(b"new-bundle").decode()},
                   {"op": "test", "path": "/webhooks/1/name", "value": cfg["webhooks"][1]["name"]},
                   {"op": "add", "path": "/webhooks/1/clientConfig/caBundle",
                    "value": base64.b64encode(b"new-bundle").decode()}]
    cfg["webhooks"].reverse()                       # someone reorders between our read and our patch
    code, _ = stub.dispatch("PATCH", f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{MUT}",
                            ops, "application/json-patch+json")
    assert code == 422
    assert rec.reconcile().patched == [MUT]
    assert len(set(_bundles(stub))) == 1


def test_concurrent_replicas_make_exactly_one_secret(stub, tmp_path):
    """Three replicas start together on an empty cluster: one POST wins, the others adopt its Secret."""
    dirs = [tmp_path / f"r{i}" for i in range(3)]
    for d in dirs:
        d.mkdir()
    recs = [_reconciler(stub, d) for d in dirs]
    barrier = threading.Barrier(len(recs))
    results, errors = [None] * len(recs), []

    def go(i):
        try:
            barrier.wait(timeout=5)
            results[i] = recs[i].reconcile()
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(recs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert [r.secret_action for r in results].count("created") == 1
    assert sum(1 for m, p in stub.requests if m == "POST" and p.endswith("/secrets")) >= 1
    served = {(d / "tls.crt").read_bytes() for d in dirs}
    assert len(served) == 1, "every replica must serve the same certificate"
    assert len(set(_bundles(stub))) == 1


def test_expiring_leaf_is_renewed_under_the_same_ca(stub, tmp_path):
    rec = _reconciler(stub, tmp_path)
    sans = rec.cfg.sans
    now = dt.datetime.now(dt.timezone.utc)
    short = cabundle.new_material(None, sans, now, leaf_days=5)
    stub.secrets[(NS, SECRET)] = {**cabundle.secret_object(rec.cfg, short), "metadata": {
        "name": SECRET, "namespace": NS, "resourceVersion": "7"}}
    assert "expires" in cabundle.renewal_reason(short, sans, now)
    result = rec.reconcile()
    assert result.secret_action == "renewed"
    data = cabundle.secret_data(stub.secrets[(NS, SECRET)])
    assert data["ca.crt"] == short["ca.crt"], "same CA: no caBundle churn"
    leaf = x509.load_pem_x509_certificate(data["tls.crt"])
    assert leaf.not_valid_after_utc - now > dt.timedelta(days=300)


def test_expiring_ca_is_replaced_and_old_ca_stays_in_bundle(stub, tmp_path):
    now = dt.datetime.now(dt.timezone.utc)
    sans = certs.service_dns_names(SVC, NS)
    old_ca, old_key = certs.make_ca(days=100)
    leaf, leaf_key = certs.issue_serving_cert(old_ca, old_key, sans, days=90)
    old = {"ca.crt": cabundle._pem(old_ca), "ca.key": cabundle._key_pem(old_key),
           "tls.crt": cabundle._pem(leaf), "tls.key": cabundle._key_pem(leaf_key)}
    assert "CA expires" in cabundle.renewal_reason(old, sans, now)
    fresh = cabundle.new_material(old, sans, now)
    cas = x509.load_pem_x509_certificates(fresh["ca.crt"])
    assert len(cas) == 2 and cas[1] == old_ca and cas[0] != old_ca
    assert cabundle.renewal_reason(fresh, sans, now) is None


def test_wrong_san_and_garbage_are_renewed(stub, tmp_path):
    now = dt.datetime.now(dt.timezone.utc)
    sans = certs.service_dns_names(SVC, NS)
    other = cabundle.new_material(None, certs.service_dns_names("other", NS), now)
    assert "do not cover" in cabundle.renewal_reason(other, sans, now)
    assert "unreadable" in cabundle.renewal_reason({k: b"junk" for k in cabundle.SECRET_KEYS}, sans, now)
    assert "lacks" in cabundle.renewal_reason({"tls.crt": b"x"}, sans, now)


def test_conflicting_renewal_rereads_instead_of_overwriting(stub, tmp_path):
    """Our PUT carries the resourceVersion we read; a stale one gets 409 and we adopt the newer Secret."""
    rec = _reconciler(stub, tmp_path)
    rec.reconcile()
    good = cabundle.secret_data(stub.secrets[(NS, SECRET)])
    real_read = rec.core.read_namespaced_secret
    calls = {"n": 0}

    def read_then_someone_renews(name, namespace):
        obj = real_read(name, namespace)
        calls["n"] += 1
        if calls["n"] == 1:     # we read a broken Secret; meanwhile another replica fixes it
            obj.data = {"tls.crt": base64.b64encode(b"junk").decode()}
            with stub.lock:
                stub.secrets[(NS, SECRET)]["metadata"]["resourceVersion"] = stub._next_rv()
        return obj

    rec.core.read_namespaced_secret = read_then_someone_renews
    data, action = rec.ensure_secret()
    assert action == "unchanged" and data == good
    assert ("PUT", f"/api/v1/namespaces/{NS}/secrets/{SECRET}") in stub.requests


def test_transient_api_errors_are_retried(stub, tmp_path):
    stub.fail_next = [500, 503, 500]
    rec = _reconciler(stub, tmp_path)
    assert cabundle.run(rec, threading.Event(), once=True, deadline_s=20) == 0
    assert len(set(_bundles(stub))) == 1 and (tmp_path / "tls.crt").exists()


def test_missing_configuration_gives_up_with_a_clear_reason(stub, tmp_path, capsys):
    cfg = cabundle.CertsConfig(namespace=NS, secret=SECRET, service=SVC, mutating=("no-such-config",),
                               interval_s=0.05, max_backoff_s=0.2)
    rec = cabundle.CertsReconciler(cfg, cabundle._api_client(str(stub.kubeconfig)))
    assert cabundle.run(rec, threading.Event(), once=True, deadline_s=1.5) == 1
    err = capsys.readouterr().err
    assert "no-such-config not found: apply bpfinit's manifests first" in err


def test_cli_once_end_to_end_and_bad_input(stub, tmp_path):
    out = tmp_path / "tls"
    out.mkdir()
    args = [sys.executable, "-m", "webhook.cabundle", "--once", f"--kubeconfig={stub.kubeconfig}",
            f"--namespace={NS}", f"--secret={SECRET}", f"--service={SVC}",
            f"--mutating-webhook-configuration={MUT}", f"--validating-webhook-configuration={VAL}",
            f"--out-dir={out}"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (out / "tls.crt").exists() and len(set(_bundles(stub))) == 1
    bad = subprocess.run([*args[:4], "--kubeconfig=/nonexistent/kubeconfig", *args[5:]], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "cannot load Kubernetes credentials" in bad.stderr
    assert "Traceback" not in bad.stderr
    no_target = subprocess.run([*args[:4], *args[4:8], f"--out-dir={out}"], cwd=REPO, capture_output=True,
                               text=True, timeout=60)
    assert no_target.returncode == 2 and "at least one" in no_target.stderr and "Traceback" not in no_target.stderr
