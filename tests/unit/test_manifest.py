"""Manifests as pure values: path rules, symlink containment, canonical form and digests."""

from __future__ import annotations

import posixpath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dstack.core.manifest import (
    EMPTY_HASH,
    Entry,
    Manifest,
    UnsafePath,
    check_symlinks,
    normalize_relative_path,
    validate_relative_path,
)

H = "ab" * 32


def f(path: str, size: int = 1, mode: int = 0o644, h: str = H) -> Entry:
    return Entry(path=path, kind="file", mode=mode, size=size, hash=h)


def d(path: str) -> Entry:
    return Entry(path=path, kind="dir", mode=0o755)


def ln(path: str, target: str) -> Entry:
    return Entry(path=path, kind="symlink", mode=0o777, target=target)


@pytest.mark.parametrize("path", ["a", "a/b/c", ".hidden", "a/..b", "...", "données/日本語 🚀.txt", "a b/c"])
def test_normal_relative_paths_are_accepted(path):
    assert validate_relative_path(path) == path


@pytest.mark.parametrize(("path", "why"), [
    ("", "empty"),
    ("/etc/passwd", "absolute"),
    ("..", "'..'"),
    ("a/../../b", "'..'"),
    ("a/..", "'..'"),
    ("a//b", "not normalised"),
    ("./a", "not normalised"),
    ("a/", "not normalised"),
    ("a\0b", "NUL"),
    ("bad-\udcff", "UTF-8"),
])
def test_unsafe_paths_are_rejected_with_a_reason(path, why):
    with pytest.raises(UnsafePath, match=why):
        validate_relative_path(path)


@pytest.mark.parametrize(("given_path", "normal"), [("./data/", "data"), ("out//x", "out/x"), (".", "."),
                                                     ("a/./b", "a/b")])
def test_user_paths_are_normalised(given_path, normal):
    assert normalize_relative_path(given_path) == normal


@pytest.mark.parametrize("path", ["../data", "/data", "data/../..", "a/../b", "  "])
def test_user_paths_leaving_the_folder_are_rejected(path):
    with pytest.raises(UnsafePath):
        normalize_relative_path(path)


def test_entry_kinds_carry_exactly_their_fields():
    with pytest.raises(ValueError, match="needs a BLAKE3 hash"):
        Entry(path="f", kind="file", size=1)
    with pytest.raises(ValueError, match="cannot have a hash"):
        Entry(path="d", kind="dir", hash=H)
    with pytest.raises(ValueError, match="needs a target"):
        Entry(path="l", kind="symlink")
    with pytest.raises(ValueError, match="cannot have a target"):
        Entry(path="f", kind="file", size=1, hash=H, target="x")
    with pytest.raises(ValueError, match="hash of non-empty"):
        Entry(path="f", kind="file", size=0, hash=H)
    with pytest.raises(ValueError):
        Entry(path="f", kind="file", size=1, hash="ABC")
    with pytest.raises(ValueError):
        Entry(path="f", kind="file", size=1, hash=H, mode=0o4755)  # no setuid in artifacts
    assert f("empty", size=0, h=EMPTY_HASH).size == 0


@pytest.mark.parametrize("target", ["/etc", "..", "../x", "a/../../x", "d/../.."])
def test_symlink_out_of_the_root_is_rejected(target):
    with pytest.raises(UnsafePath, match="points outside the artifact"):
        Manifest(entries=[d("d"), ln("link", target)])


@pytest.mark.parametrize(("entries", "link"), [
    ([d("s"), ln("s/up", ".."), ln("s/esc", "up/..")], "s/esc"),  # through a link to the root's parent
    ([ln("self", "."), ln("escape", "self/..")], "escape"),  # lexically ".", really the parent
    ([d("a"), d("a/b"), ln("a/b/root", "../.."), ln("out", "a/b/root/..")], "out"),
])
def test_symlink_escaping_through_other_symlinks_is_rejected(entries, link):
    with pytest.raises(UnsafePath, match=f"'{link}'"):
        Manifest(entries=entries)


@pytest.mark.parametrize(("entries"), [
    [d("a"), f("a/f"), ln("a/l", "f")],
    [d("a"), d("b"), ln("b/l", "../a/f"), f("a/f")],
    [d("a"), ln("a/root", ".."), ln("to-root", ".")],
    [ln("dangling", "not/there")],
    [ln("loop1", "loop2"), ln("loop2", "loop1")],
    [d("a"), d("a/b"), ln("a/b/up", ".."), ln("x", "a/b/up/..")],  # a/b/up is a, a/.. is the root
])
def test_symlinks_that_stay_inside_are_accepted(entries):
    Manifest(entries=entries)


def test_entries_must_sit_in_directories_of_the_manifest():
    with pytest.raises(UnsafePath, match="not inside a directory"):
        Manifest(entries=[f("missing/f")])
    with pytest.raises(UnsafePath, match="parent is a symlink"):
        Manifest(entries=[d("real"), ln("l", "real"), f("l/f")])
    with pytest.raises(UnsafePath, match="twice"):
        Manifest(entries=[f("a"), f("a")])


def test_digest_ignores_entry_order_and_survives_a_round_trip():
    entries = [d("b"), f("b/x"), f("a", size=0, h=EMPTY_HASH), ln("c", "b/x")]
    m1 = Manifest(entries=entries)
    m2 = Manifest(entries=list(reversed(entries)))
    assert [e.path for e in m1.entries] == ["a", "b", "b/x", "c"]
    assert m1.digest() == m2.digest() == Manifest.parse(m1.canonical_json()).digest()
    assert Manifest.build(entries).digest() == m1.digest()
    assert Manifest(entries=[*entries[:1], f("b/x", mode=0o755)]).digest() != m1.digest()
    assert (m1.files, m1.size, m1.blobs()) == (2, 1, {H})


def test_hostile_json_is_refused():
    with pytest.raises((UnsafePath, ValueError)):
        Manifest.parse(b'{"entries":[{"path":"../../etc/cron.d/x","kind":"file","mode":420,"size":1,'
                       b'"hash":"' + H.encode() + b'"}]}')
    with pytest.raises(ValueError):
        Manifest.parse(b'{"entries":[],"extra":1}')


# ---- properties ----

_component = st.sampled_from(["a", "b", "..", ".", "", "c d", "é"])


@given(st.lists(_component, min_size=1, max_size=6))
def test_a_validated_path_never_leaves_its_root(parts):
    path = "/".join(parts)
    try:
        validate_relative_path(path)
    except UnsafePath:
        return
    assert not path.startswith("/")
    assert posixpath.normpath(path) == path and not path.startswith("..")


@given(st.lists(_component, min_size=1, max_size=6), st.booleans())
def test_without_symlinks_containment_is_the_lexical_one(parts, absolute):
    """In a tree of folders only, a link escapes exactly when its normalised target leaves the root."""
    target = ("/" if absolute else "") + "/".join(parts)
    if not target.strip("/"):
        return
    kinds = {"a": "dir", "a/b": "dir", "l": "symlink"}  # the link sits at the root
    escapes = target.startswith("/") or posixpath.normpath(target).split("/")[0] == ".."
    try:
        check_symlinks(kinds, {"l": target})
        assert not escapes
    except UnsafePath:
        assert escapes


def test_a_saved_file_entry_is_the_same_as_a_validated_one():
    h = "ab" * 32
    fast = Entry.saved_file("a/b.txt", 0o644, 12, h)
    slow = Entry(path="a/b.txt", kind="file", mode=0o644, size=12, hash=h)
    assert fast == slow
    assert fast.model_dump_json(exclude_none=True) == slow.model_dump_json(exclude_none=True)
    assert Manifest.build([Entry(path="a", kind="dir", mode=0o755), fast]).digest() == \
        Manifest.build([Entry(path="a", kind="dir", mode=0o755), slow]).digest()
