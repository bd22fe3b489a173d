"""Resolving the symlinks of a tree (does each stay inside the artifact?) against the kernel's own
resolution on a real folder: random trees of folders, files and links (chains, `.`, `..`, loops,
links to folders, links through linked folders, absolute targets)."""

from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dstack.core.manifest import (
    INSIDE,
    LOOP,
    MAX_SYMLINK_HOPS,
    OUTSIDE,
    Entry,
    Manifest,
    UnsafePath,
    resolve_symlink,
    unresolved_symlinks,
)

# Names of the trees' entries. None of them is in `/` or in the folders above the root, so a path
# that has left the root can never come back into it nor meet a link of the system.
NAMES = ("a", "b", "c")
# A chain of links without a cycle meets at most (k**n - 1) / (k - 1) links (n links, targets of k
# components): under the kernel's 40, so that only cycles are loops (Python's realpath, the oracle
# where the kernel stops at a missing component, knows no limit).
SHAPES = ((5, 2), (4, 3))  # (links at most, components of a relative target at most)
_absolute_target = st.sampled_from(["/", "/usr", "/a/b"])


@st.composite
def link_trees(draw) -> dict[str, tuple[str, str | None]]:
    """path -> (kind, target): folders up to 3 levels deep, with files and symlinks in them."""
    max_links, max_parts = draw(st.sampled_from(SHAPES))
    relative = st.lists(st.sampled_from([*NAMES, ".", ".."]), min_size=1, max_size=max_parts).map("/".join)
    target = st.one_of(relative, _absolute_target)
    tree: dict[str, tuple[str, str | None]] = {}
    folders = [""]
    while folders:
        base = folders.pop()
        depth = base.count("/") + 1 if base else 0
        for name in NAMES:
            path = f"{base}/{name}" if base else name
            links = sum(1 for kind, _ in tree.values() if kind == "symlink")
            kinds = ["none", "file"] + (["dir"] if depth < 2 else []) + (["symlink"] if links < max_links else [])
            kind = draw(st.sampled_from(kinds))
            if kind == "dir":
                folders.append(path)
            if kind != "none":
                tree[path] = (kind, draw(target) if kind == "symlink" else None)
    return tree


def make_tree(root: Path, tree: dict[str, tuple[str, str | None]]) -> None:
    root.mkdir(parents=True)
    for path, (kind, target) in sorted(tree.items()):
        if kind == "dir":
            (root / path).mkdir()
        elif kind == "file":
            (root / path).write_text(path)
        else:
            os.symlink(target, root / path)


@contextmanager
def real_tree(tree: dict[str, tuple[str, str | None]]):
    """The tree on disk, as `root` below three folders of its own (named unlike any entry)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(os.path.realpath(tmp)) / "p" / "p" / "p" / "ROOT"
        make_tree(root, tree)
        yield root


def kernel_resolution(root: Path, link: str) -> tuple[str, str | None]:
    """Where the kernel takes `root/link`: (INSIDE, the path relative to root, '' for root itself),
    (OUTSIDE, None) or (LOOP, None).

    The kernel decides when it can follow the whole path (stat succeeds: realpath is that path) and
    when it finds a loop (ELOOP). Where it stops at a missing component or a file (ENOENT, ENOTDIR),
    Python's realpath carries on lexically there (as the check does, by design); a cycle of links then
    shows as a link left in its answer."""
    path = str(root / link)
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return LOOP, None
        assert e.errno in (errno.ENOENT, errno.ENOTDIR), e
        real = os.path.realpath(path)
        parts = real.split("/")
        if any(os.path.islink("/".join(parts[:i])) for i in range(2, len(parts) + 1)):
            return LOOP, None
    else:
        real = os.path.realpath(path, strict=True)
    if real == str(root):
        return INSIDE, ""
    if real.startswith(f"{root}/"):
        return INSIDE, real[len(str(root)) + 1:]
    return OUTSIDE, None


def tables(tree: dict[str, tuple[str, str | None]]) -> tuple[dict[str, str], dict[str, str]]:
    kinds = {path: kind for path, (kind, _) in tree.items()}
    targets = {path: target for path, (kind, target) in tree.items() if kind == "symlink"}
    return kinds, targets  # type: ignore[return-value]


@settings(max_examples=400, deadline=None)
@given(link_trees())
def test_every_link_resolves_where_the_kernel_takes_it(tree):
    kinds, targets = tables(tree)
    with real_tree(tree) as root:
        for link in targets:
            fate, where = resolve_symlink(link, kinds, targets)
            want = kernel_resolution(root, link)
            assert (fate, where if fate == INSIDE else None) == want, (link, targets[link])


@settings(max_examples=200, deadline=None)
@given(link_trees())
def test_a_manifest_refuses_exactly_the_links_that_lead_outside(tree):
    kinds, targets = tables(tree)
    with real_tree(tree) as root:
        want = {link: kernel_resolution(root, link)[0] for link in targets}
    assert {p: r.fate for p, r in unresolved_symlinks(kinds, targets).items()} == {
        p: fate for p, fate in want.items() if fate != INSIDE}
    outside = [p for p, fate in want.items() if fate == OUTSIDE]
    entries = [Entry(path=p, kind="dir") if k == "dir" else
               Entry(path=p, kind="file", size=0, hash=EMPTY) if k == "file" else
               Entry.model_construct(path=p, kind="symlink", mode=0o777, target=t)
               for p, (k, t) in tree.items()]
    if outside:
        with pytest.raises(UnsafePath, match="points outside the artifact"):
            Manifest.build(entries)
    else:
        Manifest.build(entries)  # loops included: they reach nothing


EMPTY = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"


@pytest.mark.parametrize(("tree", "link", "want"), [
    # the examples of issue 12: chains, a venv's python, a link to a folder
    ({"lib": "dir", "lib/libfoo.so.1.2": "file", "lib/libfoo.so.1": "libfoo.so.1.2",
      "lib/libfoo.so": "libfoo.so.1"}, "lib/libfoo.so", (INSIDE, "lib/libfoo.so.1.2")),
    ({"bin": "dir", "bin/python3.11": "file", "bin/python3": "python3.11", "bin/python": "python3"},
     "bin/python", (INSIDE, "bin/python3.11")),
    ({"bin": "dir", "bin/python3": "/usr/bin/python3.11", "bin/python": "python3"},
     "bin/python", (OUTSIDE, "bin/python3")),
    ({"step-100": "dir", "latest": "step-100"}, "latest", (INSIDE, "step-100")),
    ({"step-100": "dir", "latest": "step-100", "best": "latest/../latest"}, "best", (INSIDE, "step-100")),
    # `.` and parents inside the root are fine; a self-link's `..` is the root's parent
    ({"d": "."}, "d", (INSIDE, "")),
    ({"a": "dir", "a/up": ".."}, "a/up", (INSIDE, "")),
    ({"s": ".", "e": "s/.."}, "e", (OUTSIDE, "e")),
    ({"a": "dir", "a/up": "..", "a/out": "up/.."}, "a/out", (OUTSIDE, "a/out")),
    # loops, of one link, of two, and one reached through a folder link
    ({"a": "a"}, "a", (LOOP, "a")),
    ({"a": "b", "b": "a"}, "a", (LOOP, "a")),
    ({"d": "dir", "d/x": "../l/x", "l": "d"}, "d/x", (LOOP, "d/x")),
])
def test_named_cases(tree, link, want):
    kinds = {p: ("symlink" if v not in ("dir", "file") else v) for p, v in tree.items()}
    targets = {p: v for p, v in tree.items() if kinds[p] == "symlink"}
    assert resolve_symlink(link, kinds, targets) == want


def test_the_kernels_hop_limit_is_kept_exactly():
    """A chain of 40 links resolves, one of 41 is ELOOP, as in the kernel (oracle on a real folder)."""
    for n in (MAX_SYMLINK_HOPS, MAX_SYMLINK_HOPS + 1):
        tree = {"f": ("file", None), "l0": ("symlink", "f")}
        tree |= {f"l{i}": ("symlink", f"l{i - 1}") for i in range(1, n)}
        kinds, targets = tables(tree)
        with real_tree(tree) as root:
            want = kernel_resolution(root, f"l{n - 1}")
        assert want == ((INSIDE, "f") if n == MAX_SYMLINK_HOPS else (LOOP, None))
        fate, where = resolve_symlink(f"l{n - 1}", kinds, targets)
        assert (fate, where if fate == INSIDE else None) == want

