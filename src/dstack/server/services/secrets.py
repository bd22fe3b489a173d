"""Backends' credentials at rest: encrypted (Fernet: AES-128-CBC with HMAC-SHA256) with a key that is kept
outside the database, in `DSTACK_HOME/server/backends.key` (mode 0600, made once, never overwritten). A copy of
the database alone opens nothing. The server's own id (`server.id`, the `dstack:server` tag on what its backends
create) is made here too."""

from __future__ import annotations

import json
import os
import secrets as random
from pathlib import Path

from dstack.core.errors import ConfigError

KEY_FILE = "backends.key"
ID_FILE = "server.id"


class Sealer:
    def __init__(self, folder: Path):
        self.path = Path(folder) / KEY_FILE
        self._fernet = None

    def _key(self):
        if self._fernet is None:
            from cryptography.fernet import Fernet

            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "wb") as f:
                    f.write(Fernet.generate_key())
            try:
                self._fernet = Fernet(self.path.read_bytes().strip())
            except ValueError:
                raise ConfigError(f"{self.path} is not a key (44 characters of base64)",
                                  hint="restore it from a backup, or remove it and add the backends again") from None
        return self._fernet

    def seal(self, values: dict) -> str:
        return self._key().encrypt(json.dumps(values).encode()).decode()

    def open(self, token: str, backend: str) -> dict:
        from cryptography.fernet import InvalidToken

        try:
            return json.loads(self._key().decrypt(token.encode()))
        except InvalidToken:
            raise ConfigError(f"the credentials of backend '{backend}' cannot be opened with {self.path}",
                              hint="the key was replaced: restore it, or `dstack backends add` the backend "
                                   "again") from None


def server_id(folder: Path) -> str:
    """This server's id: random, made once (the tag that marks what its backends create)."""
    path = Path(folder) / ID_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    value = random.token_hex(8)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return value
