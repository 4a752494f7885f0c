"""PolicyStore: file reload (incl. ConfigMap symlink swaps), last good policy kept, CRD events and watch."""
from __future__ import annotations

import json
import os
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.jsonhttp import JsonHandler
from webhook.policy import PolicyError, PolicyStore

from .corpus import policy_doc, settings_doc

WAIT_S = 10


def write(path: Path, *docs) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump_all(list(docs)))
    os.replace(tmp, path)


def wait_for(predicate, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def allow(store, ns="ns"):
    return store.allow_list_for(ns, {})


def test_reload_on_change_and_invalid_file_kept_out(tmp_path):
    path = tmp_path / "policy.yaml"
    write(path, policy_doc("p", "ns", allowedDestinations=["10.0.0.0/8:443"]))
    store = PolicyStore.from_file(str(path), poll_interval=0.05)
    try:
        assert allow(store) == ["10.0.0.0/8:443"]
        write(path, policy_doc("p", "ns", allowedDestinations=["10.0.0.0/8:8443"]))
        assert wait_for(lambda: allow(store) == ["10.0.0.0/8:8443"])
        generation = store.generation
        write(path, policy_doc("p", "ns", allowedDestinations=["10.0.0.1/8:443"]))  # host bits: invalid
        assert wait_for(lambda: str(path) in store.errors)
        assert "has host bits set" in store.errors[str(path)] and "spec.allowedDestinations[0]" in store.errors[str(path)]
        assert allow(store) == ["10.0.0.0/8:8443"] and store.generation == generation  # last good stays
        path.write_text("{ not yaml")
        assert wait_for(lambda: "invalid YAML" in store.errors.get(str(path), ""))
        assert allow(store) == ["10.0.0.0/8:8443"]
        write(path, policy_doc("p", "ns", allowedDestinations=["192.168.0.0/16"]))
        assert wait_for(lambda: allow(store) == ["192.168.0.0/16"])
        assert str(path) not in store.errors
        path.unlink()
        assert wait_for(lambda: "cannot read policy file" in store.errors.get(str(path), ""))
        assert allow(store) == ["192.168.0.0/16"]
    finally:
        store.close()


def _configmap_volume(root: Path, content: str, stamp: str) -> None:
    """What the kubelet does for a ConfigMap volume: a timestamped dir, `..data` symlink swapped atomically."""
    data_dir = root / f"..{stamp}"
    data_dir.mkdir()
    (data_dir / "policy.yaml").write_text(content)
    tmp_link = root / "..data_tmp"
    tmp_link.symlink_to(data_dir.name)
    os.replace(tmp_link, root / "..data")
    if not (root / "policy.yaml").is_symlink():
        (root / "policy.yaml").symlink_to("..data/policy.yaml")


def test_configmap_style_atomic_symlink_swap(tmp_path):
    one = yaml.safe_dump(policy_doc("p", "ns", allowedDestinations=["10.0.0.0/8"]))
    two = yaml.safe_dump(policy_doc("p", "ns", allowedDestinations=["10.1.0.0/16"]))
    _configmap_volume(tmp_path, one, "2026_01_01_00_00_00.1")
    store = PolicyStore.from_file(str(tmp_path / "policy.yaml"), poll_interval=0.05)
    try:
        assert allow(store) == ["10.0.0.0/8"]
        # same size, same mtime second: only the inode changes
        _configmap_volume(tmp_path, two, "2026_01_01_00_00_01.2")
        assert wait_for(lambda: allow(store) == ["10.1.0.0/16"])
    finally:
        store.close()


def test_first_load_must_be_valid(tmp_path):
    path = tmp_path / "policy.yaml"
    write(path, policy_doc("p", "ns", mode="Never"))
    with pytest.raises(PolicyError, match="spec.mode: 'Never'"):
        PolicyStore.from_file(str(path), watch=False)


def test_touch_without_change_does_not_rebuild(tmp_path):
    path = tmp_path / "policy.yaml"
    write(path, policy_doc("p", "ns"))
    store = PolicyStore.from_file(str(path), watch=False)
    generation = store.generation
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 5_000_000))
    assert store.reload_now() is False and store.generation == generation


def test_watcher_restarts_after_fork(tmp_path):
    path = tmp_path / "policy.yaml"
    write(path, policy_doc("p", "ns", allowedDestinations=["10.0.0.0/8"]))
    store = PolicyStore.from_file(str(path), poll_interval=0.05)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: like a gunicorn worker forked from a master that loaded the store
        code = 1
        try:
            os.close(read_end)
            store.current()
            write(path, policy_doc("p", "ns", allowedDestinations=["10.9.0.0/16"]))
            if wait_for(lambda: allow(store) == ["10.9.0.0/16"]):
                code = 0
        finally:
            os.write(write_end, bytes([code]))
            os._exit(0)
    os.close(write_end)
    try:
        result = os.read(read_end, 1)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
        store.close()
    assert result == b"\x00"


# ---- CRD objects -----------------------------------------------------------------------------------
def test_crd_events_and_last_good_version(tmp_path):
    store = PolicyStore()
    good = policy_doc("kafka", "ns", allowedDestinations=["172.20.0.0/16:9092"])
    assert store.apply_crd_event("ADDED", good) is None
    assert allow(store) == ["172.20.0.0/16:9092"]
    bad = policy_doc("kafka", "ns", allowedDestinations=["0.0.0.0/0:0"])
    error = store.apply_crd_event("MODIFIED", bad)
    assert "crd, EgressBypassPolicy ns/kafka: spec.allowedDestinations[0]" in error
    assert allow(store) == ["172.20.0.0/16:9092"]           # last good version stays in force
    store.apply_crd_event("MODIFIED", policy_doc("kafka", "ns", allowedDestinations=["172.20.0.0/16:9093"]))
    assert allow(store) == ["172.20.0.0/16:9093"] and "crd ns/kafka" not in store.errors
    store.apply_crd_event("DELETED", good)
    assert allow(store) is None


def test_crd_exemption_outside_the_exemption_namespace_is_refused():
    store = PolicyStore()
    error = store.apply_crd_event("ADDED", policy_doc("sneaky", "ns", exemption=True, namespaces=["*"]))
    assert "exemptions can only be granted from namespace bpfinit-system" in error
    assert store.current().policies == ()


def test_settings_change_revalidates_crd_objects(tmp_path):
    path = tmp_path / "policy.yaml"
    write(path, settings_doc(exemptionNamespace="security"))
    store = PolicyStore.from_file(str(path), watch=False)
    store.apply_crd_event("ADDED", policy_doc("legacy", "security", exemption=True, namespaces=["ns"]))
    assert store.current().resolve("ns", {}).exemption is not None
    write(path, settings_doc(exemptionNamespace="platform"))
    os.utime(path, ns=(1, 1))  # make sure the fingerprint changes even within one mtime tick
    assert store.reload_now()
    assert store.current().resolve("ns", {}).exemption is None  # the grant no longer comes from the right place
    assert "exemptions can only be granted from namespace platform" in store.errors["crd security/legacy"]


def test_crd_policy_overrides_a_file_policy_of_the_same_name(tmp_path):
    path = tmp_path / "policy.yaml"
    write(path, policy_doc("p", "ns", allowedDestinations=["10.0.0.0/8"]))
    store = PolicyStore.from_file(str(path), watch=False)
    store.apply_crd_event("ADDED", policy_doc("p", "ns", allowedDestinations=["10.1.0.0/16"]))
    assert allow(store) == ["10.1.0.0/16"]
    store.replace_crd_objects([])
    assert allow(store) == ["10.0.0.0/8"]


class _FakeApiserver(JsonHandler):
    """Just enough of kube-apiserver's list/watch for one custom resource (no apiserver binary here)."""
    objects: list = []
    events: list = []
    watch_calls: list = []

    def do_GET(self):  # noqa: N802
        if not self.path.startswith("/apis/bpfinit.io/v1alpha1/egressbypasspolicies"):
            self.send_error(404)
            return
        if "watch=true" in self.path:
            type(self).watch_calls.append(self.path)
            body = b"".join(json.dumps(e).encode() + b"\n" for e in self.events)
            type(self).events = []
        else:
            body = json.dumps({"apiVersion": "bpfinit.io/v1alpha1", "kind": "EgressBypassPolicyList",
                               "metadata": {"resourceVersion": "7"}, "items": self.objects}).encode()
        self.send_json(200, body)


def test_crd_watch_with_the_kubernetes_client():
    from kubernetes import client

    _FakeApiserver.objects = [policy_doc("a", "ns", allowedDestinations=["10.0.0.0/8"])]
    _FakeApiserver.events = [
        {"type": "MODIFIED", "object": policy_doc("a", "ns", allowedDestinations=["10.2.0.0/16"])},
        {"type": "ADDED", "object": policy_doc("b", "other", allowedDestinations=["10.3.0.0/16"])},
    ]
    _FakeApiserver.watch_calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeApiserver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    store = PolicyStore()
    stop = threading.Event()
    try:
        config = client.Configuration()
        config.host = f"http://127.0.0.1:{server.server_address[1]}"
        watcher = store.watch_crds(client.ApiClient(config), stop=stop, timeout_seconds=1)
        assert wait_for(lambda: allow(store, "other") == ["10.3.0.0/16"])
        assert allow(store) == ["10.2.0.0/16"]
        assert any("resourceVersion=7" in call for call in _FakeApiserver.watch_calls)
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
    watcher.join(timeout=WAIT_S)
    assert not watcher.is_alive()
