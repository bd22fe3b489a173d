"""Artifacts with symlinks, saved into a real local store and built again as a dependency's tree:
chains of links (shared libraries, a virtual environment's python), links to folders, loops, and
random trees checked against the kernel's own resolution."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from test_store_local import assert_same_tree
from tests.unit.test_symlink_resolution import kernel_resolution, link_trees, make_tree

from dstack.core.manifest import INSIDE, UnsafePath
from dstack.storage.blobstore import LocalBlobStore
from dstack.storage.save import save_tree
from dstack.storage.tree import materialise, remove_tree, tree_cache, verify_tree


@pytest.fixture
def store(tmp_path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "store")


def links(m) -> dict[str, str]:
    return {e.path: e.target for e in m.entries if e.kind == "symlink"}


def save_and_mount(store: LocalBlobStore, src: Path, tmp: Path, **kw) -> tuple:
    """Save `src` (warnings collected), then build its tree as a dependency mount does."""
    warnings: list[str] = []
    m = save_tree(store, src, warn=warnings.append, **kw)
    tree = tree_cache(store, m.digest(), tmp / "trees", tmp / "cache")
    assert verify_tree(m, tree) == []
    return m, tree, warnings


def test_a_chain_of_library_links_is_saved_and_mounted_as_links(store, tmp_path):
    src = tmp_path / "out"
    (src / "lib").mkdir(parents=True)
    (src / "lib" / "libfoo.so.1.2").write_bytes(b"\x7fELF library")
    (src / "lib" / "libfoo.so.1").symlink_to("libfoo.so.1.2")
    (src / "lib" / "libfoo.so").symlink_to("libfoo.so.1")
    m, tree, warnings = save_and_mount(store, src, tmp_path)
    assert warnings == []
    assert links(m) == {"lib/libfoo.so": "libfoo.so.1", "lib/libfoo.so.1": "libfoo.so.1.2"}
    assert os.readlink(tree / "lib" / "libfoo.so") == "libfoo.so.1"
    assert (tree / "lib" / "libfoo.so").read_bytes() == b"\x7fELF library"
    assert_same_tree(src, tree, exact_modes=False)


def make_venv(root: Path, python: str | None) -> Path:
    """A virtual environment's shape: bin/python -> python3 -> python3.11, `lib64 -> lib`, packages.
    `python`: python3.11's absolute target (as `python -m venv` makes it), None for a copy."""
    (root / "bin").mkdir(parents=True)
    site = root / "lib" / "python3.11" / "site-packages" / "pkg"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("VALUE = 42\n")
    (root / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (root / "lib64").symlink_to("lib")
    if python is None:
        (root / "bin" / "python3.11").write_text("#!/bin/sh\necho python\n")
        (root / "bin" / "python3.11").chmod(0o755)
    else:
        (root / "bin" / "python3.11").symlink_to(python)
    (root / "bin" / "python3").symlink_to("python3.11")
    (root / "bin" / "python").symlink_to("python3")
    (root / "bin" / "activate").write_text("VIRTUAL_ENV=.\n")
    return root


@pytest.mark.parametrize("adopt", [False, True])
def test_a_venv_with_its_own_python_keeps_every_link(store, tmp_path, adopt):
    src = make_venv(tmp_path / "venv", python=None)
    expected = make_venv(tmp_path / "expected", python=None)  # src is moved away when adopted
    m, tree, warnings = save_and_mount(store, src, tmp_path, adopt=adopt, trees=tmp_path / "trees")
    assert warnings == []
    assert links(m) == {"bin/python": "python3", "bin/python3": "python3.11", "lib64": "lib"}
    assert os.access(tree / "bin" / "python", os.X_OK)
    assert (tree / "lib64" / "python3.11" / "site-packages" / "pkg" / "__init__.py").read_text() == "VALUE = 42\n"
    assert_same_tree(expected, tree, exact_modes=False)


def test_a_venv_whose_python_leads_outside_leaves_out_the_chain_and_saves_the_rest(store, tmp_path):
    src = make_venv(tmp_path / "venv", python="/usr/bin/python3.11")
    m, tree, warnings = save_and_mount(store, src, tmp_path)
    assert links(m) == {"lib64": "lib"}
    assert warnings == [
        "symlink 'bin/python' left out (the rest is saved): it points outside the artifact "
        "(to 'python3', through 'bin/python3.11')",
        "symlink 'bin/python3' left out (the rest is saved): it points outside the artifact "
        "(to 'python3.11', through 'bin/python3.11')",
        "symlink 'bin/python3.11' left out (the rest is saved): it points outside the artifact "
        "(to '/usr/bin/python3.11')",
    ]
    assert sorted(p.name for p in (tree / "bin").iterdir()) == ["activate"]
    assert (tree / "lib64" / "python3.11" / "site-packages" / "pkg" / "__init__.py").is_file()
    with pytest.raises(UnsafePath, match="symlink 'bin/python' points outside the artifact"):
        save_tree(store, src)  # without a warning to give, nothing is left out silently


def test_a_link_to_a_folder_is_saved_as_a_link(store, tmp_path):
    src = tmp_path / "checkpoints"
    (src / "step-100").mkdir(parents=True)
    (src / "step-100" / "model.bin").write_bytes(b"weights")
    (src / "latest").symlink_to("step-100")
    (src / "model.bin").symlink_to("latest/model.bin")  # through the linked folder
    m, tree, warnings = save_and_mount(store, src, tmp_path)
    assert warnings == [] and links(m) == {"latest": "step-100", "model.bin": "latest/model.bin"}
    assert (tree / "latest").is_symlink() and (tree / "latest" / "model.bin").read_bytes() == b"weights"
    assert (tree / "model.bin").read_bytes() == b"weights"
    assert_same_tree(src, tree, exact_modes=False)


def test_loops_are_left_out_by_name_and_links_to_the_root_or_a_parent_are_kept(store, tmp_path):
    src = tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    (src / "f").write_text("f\n")
    (src / "a").symlink_to("b")
    (src / "b").symlink_to("a")
    (src / "self").symlink_to("self")
    (src / "through").symlink_to("sub/../a/x")  # into the loop of a and b
    (src / "here").symlink_to(".")
    (src / "sub" / "up").symlink_to("..")
    (src / "sub" / "f").symlink_to("up/here/f")
    m, tree, warnings = save_and_mount(store, src, tmp_path)
    assert links(m) == {"here": ".", "sub/up": "..", "sub/f": "up/here/f"}
    assert [w.split("'")[1] for w in warnings] == ["a", "b", "self", "through"]
    assert all("a loop of symlinks" in w for w in warnings)
    assert (tree / "sub" / "f").read_text() == "f\n"
    with pytest.raises(UnsafePath, match="symlink 'a' never resolves"):
        save_tree(store, src)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(link_trees())
def test_random_trees_save_what_the_kernel_resolves_inside_and_mount_the_same_links(tree):
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(os.path.realpath(tmp))
        src = base / "p" / "p" / "p" / "ROOT"
        make_tree(src, tree)
        fates = {p: kernel_resolution(src, p) for p, (kind, _) in tree.items() if kind == "symlink"}
        store = LocalBlobStore(base / "store")
        warnings: list[str] = []
        m = save_tree(store, src, warn=warnings.append)
        kept = {p for p, (fate, _) in fates.items() if fate == INSIDE}
        assert set(links(m)) == kept
        assert len(warnings) == len(fates) - len(kept)
        built = base / "q" / "q" / "q" / "BUILT"
        materialise(store, m, built)
        try:
            assert verify_tree(m, built) == []
            for p in kept:  # each link leads to the same place in the mounted tree
                assert kernel_resolution(built, p) == fates[p], p
        finally:
            remove_tree(built)
