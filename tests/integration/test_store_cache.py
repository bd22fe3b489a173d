"""The runner's blob cache (bounded, least recently used out first) and how a runner picks its way to the store."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dstack.core.transfers import StoreAccess
from dstack.runner.transfer import usable_folder
from dstack.storage.blobstore import LocalBlobStore
from dstack.storage.cache import BlobCache, parse_size
from dstack.storage.save import save_tree
from dstack.storage.tree import tree_cache


def saved(store: LocalBlobStore, root: Path, name: str, size: int) -> str:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / f"{name}.bin").write_bytes(os.urandom(size))
    (folder / "run.sh").write_text(f"#!/bin/sh\necho {name}\n")
    (folder / "run.sh").chmod(0o755)
    return save_tree(store, folder).digest()


def test_the_cache_keeps_within_its_bound_dropping_what_no_mounted_tree_needs(tmp_path):
    # a store on another disk than the cache, as for a runner elsewhere: blobs are fetched into the cache
    store = LocalBlobStore(tmp_path / "store")
    a, b, c = (saved(store, tmp_path / "src", n, 1 << 20) for n in ("a", "b", "c"))
    cache, trees = BlobCache(tmp_path / "cache", limit=1_500_000), tmp_path / "trees"
    store.local_path = lambda h: None  # type: ignore[method-assign]  # the store as a remote one: no links to it
    for digest in (a, b):
        tree_cache(store, digest, trees, cache)
        time.sleep(0.01)
    assert cache.usage() > 2 << 20  # two trees' blobs, executables' 0555 copies included
    # over the bound, but both trees are mounted: only what they do not link goes (the 0444 blobs of run.sh,
    # which the trees link as 0555 copies)
    assert cache.prune(trees, in_use={a, b}) == (2, 0, 2 * len("#!/bin/sh\necho a\n"))
    # a is mounted least recently: it goes with its blobs; b stays
    os.utime(trees / a, (1, 1))
    pruned = cache.prune(trees, in_use={b})
    assert pruned.trees == 1 and pruned.blobs == 2 and pruned.bytes > 1 << 20
    assert not (trees / a).exists() and (trees / b).is_dir()
    assert cache.usage() <= cache.limit
    # c is mounted now; b is not: b goes
    tree_cache(store, c, trees, cache)
    cache.prune(trees, in_use={c})
    assert sorted(p.name for p in trees.iterdir()) == [c]
    # a bound of nothing: everything not mounted goes
    cache.limit = 0
    assert cache.prune(trees, in_use={c}).trees == 0 and cache.usage() > 0
    assert cache.prune(trees).trees == 1 and cache.usage() == 0 and not list(trees.iterdir())


def test_an_unbounded_cache_never_prunes(tmp_path):
    cache = BlobCache(tmp_path / "cache")
    (tmp_path / "cache" / "ab").mkdir()
    (tmp_path / "cache" / "ab" / ("ab" * 32)).write_bytes(b"x" * 100)
    assert cache.prune(tmp_path / "trees") == (0, 0, 0) and cache.usage() == 100


@pytest.mark.parametrize("text,size", [("20GB", 20 * 1000**3), ("512MB", 512 * 1000**2), ("1.5 GiB", 3 << 29),
                                       ("1000", 1000), ("2tb", 2 * 1000**4), ("0", 0)])
def test_sizes_are_read_as_written(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "20 GBs", "-1GB", "1e9"])
def test_a_size_that_is_not_one_is_refused(text):
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


def test_a_runner_uses_the_stores_folder_only_on_its_machine_and_when_it_may(tmp_path):
    store = LocalBlobStore(tmp_path / "storage")
    mine = Path("/etc/machine-id").read_text().strip() if Path("/etc/machine-id").exists() else None
    here = StoreAccess(type="local", path=str(store.root), machine_id=mine)
    assert usable_folder(here) == store.root
    assert usable_folder(here.model_copy(update={"machine_id": "another-machine"})) is None
    assert usable_folder(here.model_copy(update={"path": str(tmp_path / "elsewhere")})) is None
    assert usable_folder(StoreAccess(type="s3", presigned=True)) is None
    (store.root / "tmp").chmod(0o500)  # a store it may read but not write
    try:
        if os.geteuid() != 0:  # root may write anyway
            assert usable_folder(here) is None
    finally:
        (store.root / "tmp").chmod(0o700)


def test_the_runner_refuses_a_cache_size_that_is_not_one(tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "dstack.runner.main", "start", "--server", "http://127.0.0.1:9",
                        "--token-file", str(tmp_path / "t"), "--cache-size", "lots"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "'lots' is not a size" in p.stderr, p.stderr


def test_the_cache_is_not_pruned_while_trees_are_built_from_it(tmp_path):
    cache = BlobCache(tmp_path / "cache", limit=0)
    (tmp_path / "cache" / "ab").mkdir()
    (tmp_path / "cache" / "ab" / ("ab" * 32)).write_bytes(b"x" * 100)  # fetched, not linked by a tree yet
    with cache.using():
        assert cache.prune(tmp_path / "trees") == (0, 0, 0) and cache.usage() == 100
    assert cache.prune(tmp_path / "trees") == (1, 0, 100) and cache.usage() == 0
