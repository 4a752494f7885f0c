"""BPF_MAP_LOOKUP_BATCH through bpfsys and obsmaps.PinnedMap.items(): the batched walk returns exactly
what the key-by-key walk returns, for plain and per-CPU hashes, across several batches."""
from __future__ import annotations

import os
import struct

import pytest

from initagent import bpfsys, obsmaps
from tests.podenv import bpffs_mount

pytestmark = pytest.mark.kernel


@pytest.fixture
def hash_map():
    fds = []

    def make(kind: str) -> int:
        fd = bpfsys.map_create(bpfsys.MAP_TYPE[kind], 8, 8, 4096)
        fds.append(fd)
        return fd
    yield make
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize("count", [0, 1, 255, 256, 1000])
def test_batch_walk_equals_key_by_key_walk(hash_map, count):
    fd = hash_map("hash")
    for i in range(count):
        bpfsys.map_update(fd, struct.pack("=Q", i * 7919), struct.pack("=Q", i))
    items = bpfsys.map_items_batch(fd, 8, 8)                 # 256 per syscall: 0 to 4 batches
    assert sorted(items) == sorted((k, bpfsys.map_lookup(fd, k, 8)) for k in bpfsys.map_keys(fd, 8))
    assert len(items) == count
    assert len(bpfsys.map_items_batch(fd, 8, 8, limit=10)) == min(10, count)


def test_pinned_map_items_splits_per_cpu_values(hash_map):
    fd = hash_map("percpu_hash")
    ncpu = obsmaps.possible_cpus()
    for i in range(300):
        bpfsys.map_update(fd, struct.pack("=Q", i), struct.pack("=Q", i) * ncpu)   # same value on every CPU
    with bpffs_mount() as bpffs:
        bpfsys.obj_pin(fd, str(bpffs / "m"))
        with obsmaps.PinnedMap(bpffs / "m") as pinned:
            items = pinned.items()
            assert len(items) == 300
            assert all(per_cpu == [key] * ncpu for key, per_cpu in items)
            assert sorted(k for k, _ in items) == sorted(pinned.keys())
