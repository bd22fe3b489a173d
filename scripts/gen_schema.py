#!/usr/bin/env python3
"""Write the JSON Schema of `.dstack/workflows.yaml` to src/dstack/schemas/workflows.json.

    python scripts/gen_schema.py           # regenerate it after changing a provider's model
    python scripts/gen_schema.py --check   # exit 1 if the shipped file is stale

The schema is made from the built-in providers' models (dstack.config.schema); providers
installed from other packages are left out of the shipped file.
"""

from __future__ import annotations

import argparse
import sys

from dstack.config.schema import SCHEMA_FILE, registered_specs, render, workflows_schema


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="don't write; exit 1 if the file is stale")
    args = parser.parse_args()
    text = render(workflows_schema(registered_specs(builtin_only=True)))
    current = SCHEMA_FILE.read_text(encoding="utf-8") if SCHEMA_FILE.exists() else None
    if args.check:
        if current != text:
            print(f"{SCHEMA_FILE} is stale; run: python scripts/gen_schema.py", file=sys.stderr)
            return 1
        return 0
    if current != text:
        SCHEMA_FILE.parent.mkdir(parents=True, exist_ok=True)
        SCHEMA_FILE.write_text(text, encoding="utf-8")
        print(f"wrote {SCHEMA_FILE}")
    else:
        print(f"{SCHEMA_FILE} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
