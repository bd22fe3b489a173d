"""The `dstack` command's entry point: nothing but the import of the CLI, so that a Ctrl-C while it loads
exits quietly with 130 instead of a traceback."""

from __future__ import annotations

import os


def main() -> None:
    try:
        from dstack.cli.main import main as cli_main
    except KeyboardInterrupt:
        os._exit(130)
    cli_main()
