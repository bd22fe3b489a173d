"""An artifact as a manifest: every directory, file and symlink of a saved folder, by relative path.

Files are named by the BLAKE3 hash of their content (the blob that holds it); directories and
symlinks live only in the manifest. The manifest's own digest (BLAKE3 of its canonical JSON) names
the artifact. A manifest is only valid when it cannot reach outside its root: paths are relative,
normalised and free of `..`; every entry's parent is a directory entry of the same manifest (so no
file is ever written through a symlink); and no symlink leads outside the root (`resolve_symlink`;
a loop of links is allowed: it reaches nothing)."""

from __future__ import annotations

import operator
import re
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Literal, NamedTuple

from blake3 import blake3
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from dstack.core.errors import ConfigError

EMPTY_HASH = blake3(b"").hexdigest()
MAX_SYMLINK_HOPS = 40  # as Linux's ELOOP limit
_HASH = re.compile(r"[0-9a-f]{64}")


class UnsafePath(ConfigError):
    """A path or a symlink that would reach outside the artifact or the job's folder."""


def check_text(text: str, what: str) -> None:
    if "\0" in text:
        raise UnsafePath(f"{what} {text!r} contains a NUL byte")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePath(
            f"{what} {text.encode('utf-8', 'surrogateescape')!r} is not valid UTF-8",
            hint="artifacts hold UTF-8 file names only; rename the file",
        ) from None


def validate_relative_path(path: str, what: str = "path") -> str:
    """`path` if it is a normalised relative POSIX path (`a/b/c`) that stays below its root.

    Rejected: empty, absolute, `..` anywhere, `.` or empty components (`a//b`, `a/./b`, `a/`), NUL,
    names that are not UTF-8."""
    if not isinstance(path, str) or not path:
        raise UnsafePath(f"{what} is empty")
    check_text(path, what)
    if path.startswith("/"):
        raise UnsafePath(f"{what} '{path}' is absolute", hint="use a path relative to the artifact")
    for part in path.split("/"):
        if part == "..":
            raise UnsafePath(f"{what} '{path}' reaches outside its folder with '..'")
        if part in ("", "."):
            raise UnsafePath(f"{what} '{path}' is not normalised (empty or '.' component)")
    return path


def normalize_relative_path(path: str, what: str = "path") -> str:
    """A user-written relative path (`./data/`, `out//x`) in normal form (`data`, `out/x`); `.` for the
    folder itself. Absolute paths and `..` are rejected, not resolved."""
    if not isinstance(path, str) or not path.strip():
        raise UnsafePath(f"{what} is empty")
    check_text(path, what)
    if path.startswith("/"):
        raise UnsafePath(f"{what} '{path}' is absolute", hint="use a path relative to the job's working folder")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafePath(f"{what} '{path}' reaches outside the job's folder with '..'")
    return "/".join(parts) or "."


def validate_symlink_target(path: str, target: str) -> None:
    """The target text alone: not empty, not absolute (a saved tree moves), no NUL, UTF-8."""
    if not target:
        raise UnsafePath(f"symlink '{path}' has an empty target")
    check_text(target, f"target of symlink '{path}'")
    if target.startswith("/"):
        raise UnsafePath(
            f"symlink '{path}' points outside the artifact (absolute target '{target}')",
            hint="artifacts may hold only relative links to their own files; copy the target into the folder",
        )


INSIDE, OUTSIDE, LOOP = "inside", "outside", "loop"


class Resolved(NamedTuple):
    fate: str  # INSIDE | OUTSIDE | LOOP
    path: str  # INSIDE: the path reached ('' = the root); OUTSIDE: the link whose target leaves; LOOP: a link of it


def check_symlinks(kinds: Mapping[str, str], targets: Mapping[str, str]) -> None:
    """Raise UnsafePath unless every symlink stays inside the root (see resolve_symlink). A loop is
    allowed: it reaches nothing (saving leaves loops out, yet a manifest that holds one is safe)."""
    for path, target in targets.items():
        validate_symlink_target(path, target)
    for path, r in unresolved_symlinks(kinds, targets).items():
        if r.fate == OUTSIDE:
            raise UnsafePath(
                f"symlink '{path}' points outside the artifact (target '{targets[path]}'"
                + (f", through '{r.path}')" if r.path != path else ")"),
                hint="artifacts may hold only links to their own files; copy the target into the folder",
            )


def unresolved_symlinks(kinds: Mapping[str, str], targets: Mapping[str, str]) -> dict[str, Resolved]:
    """The symlinks that do not resolve inside the root (OUTSIDE or LOOP), by path, sorted."""
    out = {}
    for path in sorted(targets):
        r = resolve_symlink(path, kinds, targets)
        if r.fate != INSIDE:
            out[path] = r
    return out


def resolve_symlink(path: str, kinds: Mapping[str, str], targets: Mapping[str, str]) -> Resolved:
    """Where following the symlink `path` leads, resolved as the kernel does.

    `kinds` maps every path of the tree to 'file' | 'dir' | 'symlink', `targets` each symlink to its
    target; the link's folder holds no link on its way (a manifest's entries sit in directories).
    Component by component from that folder, each link met (the last component too) is expanded
    where it stands, so `s -> .` then `e -> s/..` leaves the root, which a lexical check would miss.
    Leaving the root once (`..` above it, an absolute target) is OUTSIDE, even if the path would come
    back: a saved tree moves. More than MAX_SYMLINK_HOPS links on the way is the kernel's ELOOP, where
    every cycle of links ends: LOOP. Components that do not exist, or are files, are taken lexically
    (where the kernel would stop: never more lenient than the kernel)."""
    folder, _, name = path.rpartition("/")
    stack = folder.split("/") if folder else []
    queue: deque[tuple[str, str]] = deque([(name, path)])  # (component, the link whose target holds it)
    hops = 0
    while queue:
        part, owner = queue.popleft()
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                return Resolved(OUTSIDE, owner)
            stack.pop()
            continue
        stack.append(part)
        here = "/".join(stack)
        if kinds.get(here) != "symlink":
            continue
        hops += 1
        if hops > MAX_SYMLINK_HOPS:
            return Resolved(LOOP, here)
        stack.pop()
        target = targets[here]
        if target.startswith("/"):
            return Resolved(OUTSIDE, here)
        queue.extendleft((p, here) for p in reversed(target.split("/")))
    return Resolved(INSIDE, "/".join(stack))


class Entry(BaseModel):
    """One node of a saved tree. `mode` holds the permission bits (0o777: executable bits kept)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    kind: Literal["file", "dir", "symlink"]
    mode: int = Field(default=0o644, ge=0, le=0o777)
    size: int = Field(default=0, ge=0)
    hash: str | None = None  # BLAKE3 hex of the content, files only
    target: str | None = None  # symlinks only, relative

    @model_validator(mode="after")
    def _check(self) -> Entry:
        validate_relative_path(self.path)
        if self.kind == "file":
            if self.hash is None or not _HASH.fullmatch(self.hash):
                raise ValueError(f"file '{self.path}' needs a BLAKE3 hash (64 lowercase hex digits)")
            if self.size == 0 and self.hash != EMPTY_HASH:
                raise ValueError(f"empty file '{self.path}' has the hash of non-empty content")
        elif self.hash is not None:
            raise ValueError(f"{self.kind} '{self.path}' cannot have a hash")
        if self.kind == "symlink":
            if self.target is None:
                raise ValueError(f"symlink '{self.path}' needs a target")
            validate_symlink_target(self.path, self.target)
        elif self.target is not None:
            raise ValueError(f"{self.kind} '{self.path}' cannot have a target")
        if self.kind != "file" and self.size:
            raise ValueError(f"{self.kind} '{self.path}' cannot have a size")
        return self

    @classmethod
    def saved_file(cls, path: str, mode: int, size: int, h: str) -> Entry:
        """A file entry whose fields the caller has made itself and knows are valid (a path built from
        names read from a folder, a hash it computed): no validation, ~10x cheaper than
        model_construct, which matters at 10,000s of files."""
        e = cls.__new__(cls)
        _set = object.__setattr__
        _set(e, "__dict__", {"path": path, "kind": "file", "mode": mode, "size": size, "hash": h, "target": None})
        _set(e, "__pydantic_fields_set__", _FILE_FIELDS)
        _set(e, "__pydantic_extra__", None)
        _set(e, "__pydantic_private__", None)
        return e


_FILE_FIELDS = frozenset({"path", "kind", "mode", "size", "hash"})
_path_of = operator.attrgetter("path")


class Manifest(BaseModel):
    """A saved tree: its entries sorted by path (parents before children). Immutable by convention."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    entries: list[Entry] = Field(default_factory=list)

    _json: bytes | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        self._check_structure()
        return self

    @classmethod
    def build(cls, entries: Iterable[Entry]) -> Manifest:
        """A manifest of entries that are validated already (pydantic would check each one again)."""
        m = cls.model_construct(version=1, entries=list(entries))
        m._check_structure()
        return m

    def _check_structure(self) -> None:
        self.entries.sort(key=_path_of)
        kinds: dict[str, str] = {}
        targets: dict[str, str] = {}
        for e in self.entries:
            path, kind = e.path, e.kind
            if path in kinds:
                raise UnsafePath(f"manifest lists '{path}' twice")
            parent, sep, _ = path.rpartition("/")
            if sep and kinds.get(parent) != "dir":
                raise UnsafePath(
                    f"manifest entry '{path}' is not inside a directory of the manifest"
                    + (" (its parent is a symlink)" if kinds.get(parent) == "symlink" else "")
                )
            kinds[path] = kind
            if kind == "symlink":
                targets[path] = e.target  # type: ignore[assignment]
        if targets:
            check_symlinks(kinds, targets)

    @classmethod
    def parse(cls, data: bytes | str) -> Manifest:
        return cls.model_validate_json(data)

    def canonical_json(self) -> bytes:
        """The bytes that are stored and hashed: compact UTF-8 JSON, fields in declaration order,
        no nulls. (Digests only need to be stable for stored bytes, which are hashed as they are.)"""
        if self._json is None:
            self._json = self.model_dump_json(exclude_none=True).encode()
        return self._json

    def digest(self) -> str:
        """BLAKE3 hex of the canonical JSON: the artifact's name in the store."""
        return blake3(self.canonical_json()).hexdigest()

    @property
    def files(self) -> int:
        """How many regular files."""
        return sum(1 for e in self.entries if e.kind == "file")

    @property
    def size(self) -> int:
        """Total bytes of the files (apparent size: sparse files count in full)."""
        return sum(e.size for e in self.entries if e.kind == "file")

    def blobs(self) -> set[str]:
        """Hashes of the non-empty files: the blobs this manifest needs from the store."""
        return {e.hash for e in self.entries if e.kind == "file" and e.size}  # type: ignore[misc]

