"""Kernel headers on real nodes (docs/deploy.md §4): the webhook mounts the node's /lib/modules and /usr/src
at /host/..., and initagent/headers.py prefers an exact kernel match anywhere, then the image's Debian headers,
then the node's nearest. The trees here are laid out like Debian's packages (absolute symlinks included);
the kernel test compiles a real program with bcc from headers found through such a host mount."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from initagent import headers
from webhook.mutate import MutationSettings, agent_volume_mounts, agent_volumes

RELEASE = "6.9.0-3-amd64"          # the "node kernel" of the layout tests


@pytest.fixture(autouse=True)
def _no_kheaders_and_x86(monkeypatch, tmp_path):
    # This machine has no /sys/kernel/kheaders.tar.xz, but a node might: keep the tests about directories.
    monkeypatch.setattr(headers, "KHEADERS", tmp_path / "no-kheaders.tar.xz")
    monkeypatch.setattr(headers, "_arch", lambda: "x86")


def debian_headers(usr_src: Path, version: str, flavour: str = "amd64") -> tuple[Path, Path]:
    """linux-headers-<version>-<flavour> (generated files) + linux-headers-<version>-common (the sources)."""
    build, common = usr_src / f"linux-headers-{version}-{flavour}", usr_src / f"linux-headers-{version}-common"
    for d in (build / "include" / "generated" / "uapi", build / "arch" / "x86" / "include" / "generated",
              common / "include" / "linux", common / "arch" / "x86" / "include"):
        d.mkdir(parents=True, exist_ok=True)
    return build, common


def node_modules_links(host: Path, release: str, build_target: str, source_target: str) -> None:
    """/lib/modules/<release>/{build,source} as Debian ships them: ABSOLUTE links into the node's /usr/src."""
    base = host / "lib" / "modules" / release
    base.mkdir(parents=True)
    (base / "build").symlink_to(build_target)
    (base / "source").symlink_to(source_target)


def test_agent_mounts_node_headers_under_host_without_hiding_the_image_ones():
    mounts = {m["mountPath"]: m for m in agent_volume_mounts()}
    volumes = {v["name"]: v for v in agent_volumes()}
    assert "/usr/src" not in mounts and "/lib/modules" not in mounts
    for mount_path, host_path in (("/host/usr/src", "/usr/src"), ("/host/lib/modules", "/lib/modules")):
        assert mounts[mount_path]["readOnly"] is True
        assert volumes[mounts[mount_path]["name"]]["hostPath"]["path"] == host_path
        # what the agent searches is what the webhook mounts
        assert Path(mount_path) == headers.HOST_ROOT / host_path.lstrip("/")
    assert MutationSettings("x").agent_image == "x"


def test_exact_node_match_via_lib_modules_wins_and_absolute_links_stay_on_the_node(tmp_path):
    image, host = tmp_path / "image", tmp_path / "host"
    debian_headers(image / "usr/src", "6.1.0-56")                       # the image's Debian 12 headers
    build, common = debian_headers(host / "usr/src", "6.9.0-3")
    node_modules_links(host, RELEASE, f"/usr/src/{build.name}", f"/usr/src/{common.name}")
    found = headers.find(release=RELEASE, host_root=host, image_root=image)
    assert found.source == str(common)                                 # under host/, not the image's /usr/src
    assert f"-I{build}/include" in found.cflags and all(str(host) in f for f in found.cflags)
    assert found.origin == str(host / "lib/modules" / RELEASE)


def test_exact_node_match_in_usr_src_wins_over_the_image(tmp_path):
    image, host = tmp_path / "image", tmp_path / "host"
    debian_headers(image / "usr/src", "6.1.0-56")
    debian_headers(host / "usr/src", "6.1.0-50")                       # nearer to nothing in particular
    build, common = debian_headers(host / "usr/src", "6.9.0-3")
    found = headers.find(release=RELEASE, host_root=host, image_root=image)
    assert found.source == str(common) and found.version == "6.9.0-3"


def test_exact_image_match_wins_over_the_node(tmp_path):
    image, host = tmp_path / "image", tmp_path / "host"
    build, common = debian_headers(image / "usr/src", "6.9.0-3")
    node_build, node_common = debian_headers(host / "usr/src", "6.9.0-2")
    found = headers.find(release=RELEASE, host_root=host, image_root=image)
    assert found.source == str(common)


def test_without_an_exact_match_the_image_headers_beat_the_nodes_nearest(tmp_path):
    image, host = tmp_path / "image", tmp_path / "host"
    _, image_common = debian_headers(image / "usr/src", "6.1.0-56")
    debian_headers(host / "usr/src", "6.9.0-1")                        # nearer, but not exact
    assert headers.find(release=RELEASE, host_root=host, image_root=image).source == str(image_common)


def test_the_nodes_nearest_is_the_last_resort(tmp_path):
    image, host = tmp_path / "image", tmp_path / "host"
    (image / "usr/src").mkdir(parents=True)
    debian_headers(host / "usr/src", "5.10.0-30")
    _, near = debian_headers(host / "usr/src", "6.8.0-1")
    assert headers.find(release=RELEASE, host_root=host, image_root=image).source == str(near)


def test_broken_node_links_fall_through_and_nothing_found_names_every_place(tmp_path):
    image, host = tmp_path / "image", tmp_path / "host"
    node_modules_links(host, RELEASE, "/usr/src/linux-headers-gone", "/usr/src/linux-headers-gone-common")
    with pytest.raises(headers.HeadersError) as err:
        headers.find(release=RELEASE, host_root=host, image_root=image)
    message = str(err.value)
    for place in (f"{host}/lib/modules/{RELEASE}/build", f"{host}/usr/src/linux-headers-*",
                  f"{image}/usr/src/linux-headers-*", "--kernel-headers"):
        assert place in message


def test_explicit_directory_still_wins(tmp_path):
    host = tmp_path / "host"
    build, common = debian_headers(host / "usr/src", "6.9.0-3")
    other_build, other_common = debian_headers(tmp_path / "mine", "6.2.0-1")
    found = headers.find(str(other_build), release=RELEASE, host_root=host, image_root=tmp_path / "image")
    assert found.source == str(other_common)


COMPILE_CHECK = r"""
import json, sys
from pathlib import Path
from initagent import headers
found = headers.find(release=sys.argv[1], host_root=Path(sys.argv[2]), image_root=Path(sys.argv[3]))
import os
os.environ.update(found.environ())
from bcc import BPF
prog = BPF(text=b'''
#include <linux/bpf.h>
#include <linux/if_ether.h>
int keep_ip(struct __sk_buff *skb) { return skb->protocol == htons(ETH_P_IP) ? skb->len : 0; }
''', cflags=list(found.cflags))
fn = prog.load_func(b"keep_ip", BPF.SOCKET_FILTER)
print(json.dumps({"source": found.source, "origin": found.origin, "fd": fn.fd}))
"""


@pytest.mark.kernel
def test_bcc_compiles_with_node_headers_found_through_the_host_mount(tmp_path):
    """A node whose /lib/modules/<uname -r>/build is an absolute link into its /usr/src, seen under a
    host root exactly as the agent sees it: the found headers compile and load a cgroup program."""
    if os.geteuid() != 0:
        pytest.fail("kernel test: run as root")
    real = sorted(Path("/usr/src").glob("linux-headers-*-amd64"))
    assert real, "this machine's Debian headers (linux-headers-amd64) are missing"
    real_build = real[-1]
    real_common = real_build.with_name(real_build.name[: -len("amd64")] + "common")
    host, image = tmp_path / "host", tmp_path / "image"
    (host / "usr/src").mkdir(parents=True)
    (image / "usr/src").mkdir(parents=True)            # an image without headers: only the node has them
    # The node's packages (linked in, not copied: 90 MB), and its absolute /lib/modules links.
    (host / "usr/src" / real_build.name).symlink_to(real_build)
    (host / "usr/src" / real_common.name).symlink_to(real_common)
    release = platform.release()
    node_modules_links(host, release, f"/usr/src/{real_build.name}", f"/usr/src/{real_common.name}")
    proc = subprocess.run([sys.executable, "-c", COMPILE_CHECK, release, str(host), str(image)],
                          capture_output=True, text=True, timeout=240,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    assert result["origin"] == str(host / "lib/modules" / release) and result["fd"] > 0
    assert result["source"] == str(real_common.resolve())
