"""`dstack backends [add|test|remove]` and `dstack limits [set|remove]`: where on-demand runners come from, and
how many and which of them may exist. Credentials never go on the command line (ps and shell history show it):
from the environment (`<KIND>_<KEY>`, e.g. AWS_SECRET_ACCESS_KEY), a file, or a hidden prompt."""

from __future__ import annotations

import json
import os
import sys

import click

CONTEXT = {"help_option_names": ["-h", "--help"]}


def _echo_json(value) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


@click.group(invoke_without_command=True, context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def backends(ctx: click.Context, as_json: bool) -> None:
    """List the backends that start runners on demand, with their limits and instances.

    \b
    dstack backends add KIND [--name N] [--set KEY=VALUE]...   check and keep a backend (e.g. aws, docker)
    dstack backends test NAME                                  check a backend against its provider
    dstack backends remove NAME                                forget it; its instances are terminated
    dstack backends kinds                                      the installed kinds and their settings
    """
    if ctx.invoked_subcommand is not None:
        return
    from dstack.api.embedded import connect

    found = connect().backends()
    if as_json:
        _echo_json(found)
        return
    from dstack.cli.table import print_table

    print_table(("BACKEND", "KIND", "SETTINGS", "LIMITS", "INSTANCES", "NOTE"),
                [(b["name"], b["kind"], _settings(b), _limits(b["limits"]), str(b["instances"]), b.get("note") or "")
                 for b in found])


def _settings(b: dict) -> str:
    shown = [f"{k}={v}" for k, v in b["settings"].items() if v not in (None, [], {}, "")]
    return ", ".join(shown + [f"{k}=(set)" for k in b.get("secrets", [])])


def _limits(lim: dict) -> str:
    parts = [] if lim.get("enabled", True) else ["disabled"]
    if lim.get("regions"):
        parts.append("regions " + ",".join(lim["regions"]))
    if lim.get("instance_types"):
        parts.append("types " + ",".join(lim["instance_types"]))
    if lim.get("spot", "either") != "either":
        parts.append(lim["spot"])
    if lim.get("max_total") is not None:
        parts.append(f"at most {lim['max_total']}")
    parts += [f"at most {n} {t}" for t, n in (lim.get("max_per_type") or {}).items()]
    if lim.get("max_price") is not None:
        parts.append(f"<= ${lim['max_price']:.2f}/h")
    if lim.get("idle_timeout") is not None:
        parts.append(f"idle {lim['idle_timeout']:g}s")
    return ", ".join(parts) or "none"


def _value(text: str):
    import yaml

    try:
        return yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text


def _gather(kind: str, pairs: tuple[str, ...], secrets_file: str | None, kinds: list[dict],
            secret_files: tuple[str, ...] = ()) -> dict:
    """The settings given: --set KEY=VALUE (values read as YAML: numbers, true, [a, b]), and the kind's secrets
    from the environment, --secrets-file, or a hidden prompt."""
    info = next((k for k in kinds if k["kind"] == kind), None)
    if info is None:
        names = ", ".join(k["kind"] for k in kinds) or "none"
        raise click.UsageError(f"no backend kind '{kind}' is installed (installed: {names})")
    secrets = set(info.get("secrets", []))
    settings: dict = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise click.UsageError(f"--set {pair!r}: expected KEY=VALUE")
        if key in secrets:
            raise click.UsageError(f"'{key}' is a credential: not on the command line (ps and shell history show "
                                   f"it); set {kind.upper()}_{key.upper()} in the environment, use --secrets-file, "
                                   "or answer the prompt")
        if key not in info["settings"]:
            from dstack.core.errors import did_you_mean

            close = did_you_mean(key, info["settings"])
            raise click.UsageError(f"the {kind} backend has no setting '{key}'" + (f" ({close})" if close else "")
                                   + f"; its settings: {', '.join(info['settings'])}")
        settings[key] = _value(value)
    from_file: dict = {}
    if secrets_file:
        import yaml

        try:
            with open(secrets_file) as f:
                from_file = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise click.UsageError(f"--secrets-file {secrets_file}: {e}") from None
        if not isinstance(from_file, dict):
            raise click.UsageError(f"--secrets-file {secrets_file}: expected KEY: VALUE lines")
    for pair in secret_files:  # --secret-file private_key=~/.ssh/id_ed25519: the file's text is the secret
        key, eq, path = pair.partition("=")
        if not eq or key not in secrets:
            raise click.UsageError(f"--secret-file {pair!r}: expected KEY=PATH, KEY one of the {kind} backend's "
                                   f"credentials ({', '.join(sorted(secrets)) or 'it has none'})")
        try:
            with open(os.path.expanduser(path)) as f:
                from_file[key] = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise click.UsageError(f"--secret-file {key}: cannot read {path}: {e}") from None
    for key in info.get("secrets", []):
        env = f"{kind.upper()}_{key.upper()}"
        if key in from_file:
            settings[key] = str(from_file[key])
        elif os.environ.get(env):
            settings[key] = os.environ[env]
        elif info["settings"].get(key, {}).get("required"):
            if not sys.stdin.isatty():
                raise click.UsageError(f"the {kind} backend needs '{key}': set {env}, or use --secrets-file")
            settings[key] = click.prompt(key, hide_input=True)
    return settings


@backends.command(context_settings=CONTEXT)
@click.argument("kind")
@click.option("--name", default=None, help="Its name (default: the kind).")
@click.option("--set", "pairs", multiple=True, metavar="KEY=VALUE", help="A setting (repeatable); see `backends kinds`.")
@click.option("--secrets-file", type=click.Path(dir_okay=False), default=None,
              help="A YAML file of credentials (KEY: VALUE), instead of the environment or a prompt.")
@click.option("--secret-file", "secret_files", multiple=True, metavar="KEY=PATH",
              help="A credential read from a file, e.g. private_key=~/.ssh/id_ed25519 (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def add(kind: str, name: str | None, pairs: tuple[str, ...], secrets_file: str | None, secret_files: tuple[str, ...],
        as_json: bool) -> None:
    """Check a backend of KIND against its provider, then keep it: the server starts runners there when jobs
    wait, within the backend's limits (`dstack limits`). Its credentials are stored encrypted."""
    from dstack.api.embedded import connect

    client = connect()
    settings = _gather(kind, pairs, secrets_file, client.backend_kinds(), secret_files)
    added = client.add_backend(name or kind, kind, settings)
    if as_json:
        _echo_json(added)
        return
    click.echo(f"Added backend {added['name']} ({added['kind']}): {added.get('note') or 'it works'}.")
    click.echo(f"Limits: {_limits(added['limits'])} (`dstack limits set {added['name']} ...` to change them).")


@backends.command(context_settings=CONTEXT)
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def test(name: str, as_json: bool) -> None:
    """Check backend NAME against its provider (its credentials, its regions)."""
    from dstack.api.embedded import connect

    tested = connect().test_backend(name)
    if as_json:
        _echo_json(tested)
        return
    click.echo(f"Backend {name} works: {tested.get('note') or 'ok'}.")


@backends.command(context_settings=CONTEXT)
@click.argument("name")
def remove(name: str) -> None:
    """Forget backend NAME: its idle instances are terminated now, busy ones once their jobs end."""
    from dstack.api.embedded import connect

    removed = connect().remove_backend(name)
    n = removed.get("instances", 0)
    click.echo(f"Removed backend {name}" + (f"; its {n} instance{'s are' if n != 1 else ' is'} being terminated"
                                            if n else "") + ".")


@backends.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def kinds(as_json: bool) -> None:
    """The kinds of backend that are installed, and their settings."""
    from dstack.api.embedded import connect

    found = connect().backend_kinds()
    if as_json:
        _echo_json(found)
        return
    for k in found:
        click.echo(f"{k['kind']}: {k.get('help') or k.get('error') or ''}")
        for key, v in k["settings"].items():
            secret = " (credential: from the environment as " + f"{k['kind'].upper()}_{key.upper()})" \
                if key in k.get("secrets", []) else ""
            default = "" if v.get("required") or v.get("default") in (None, [], {}) else f" [default: {v['default']}]"
            click.echo(f"  {key}: {v.get('type') or ''}{default}{secret}" + (f"  {v['help']}" if v.get("help") else ""))


@click.group(invoke_without_command=True, context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def limits(ctx: click.Context, as_json: bool) -> None:
    """List each backend's limits: what runners it may start, how many, at what price.

    \b
    dstack limits set BACKEND [--max-total N] [--max-price USD] [--regions R,...] ...
    dstack limits remove BACKEND     back to no limits
    """
    if ctx.invoked_subcommand is not None:
        return
    from dstack.api.embedded import connect

    found = connect().limits()
    if as_json:
        _echo_json(found)
        return
    from dstack.cli.table import print_table

    print_table(("BACKEND", "LIMITS"), [(name, _limits(lim)) for name, lim in found.items()])


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


@limits.command(name="set", context_settings=CONTEXT)
@click.argument("backend")
@click.option("--enable/--disable", "enabled", default=None, help="Whether it may start runners.")
@click.option("--regions", default=None, metavar="R,...", help="Allowed regions ('' for any).")
@click.option("--instance-types", default=None, metavar="T,...", help="Allowed instance types ('' for any).")
@click.option("--spot", type=click.Choice(["spot", "on-demand", "either"]), default=None,
              help="Spot instances only, on-demand only, or either (spot only for `interruptible` jobs).")
@click.option("--max-total", type=click.IntRange(min=0), default=None, help="The most instances at once.")
@click.option("--max-per-type", "per_type", multiple=True, metavar="TYPE=N",
              help="The most instances of a type at once (repeatable; TYPE= removes it).")
@click.option("--max-price", type=click.FloatRange(min=0), default=None, help="The most USD an hour per instance.")
@click.option("--idle-timeout", type=click.FloatRange(min=0), default=None,
              help="Seconds a runner may be idle before it goes.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def set_(backend: str, enabled: bool | None, regions: str | None, instance_types: str | None, spot: str | None,
         max_total: int | None, per_type: tuple[str, ...], max_price: float | None, idle_timeout: float | None,
         as_json: bool) -> None:
    """Change BACKEND's limits (those not given stay). Instances over a lowered limit go: idle ones at once,
    busy ones once their jobs end."""
    from dstack.api.embedded import connect

    client = connect()
    changes = {k: v for k, v in {"enabled": enabled, "regions": _csv(regions), "instance_types": _csv(instance_types),
                                 "spot": spot, "max_total": max_total, "max_price": max_price,
                                 "idle_timeout": idle_timeout}.items() if v is not None}
    if per_type:
        current = dict(client.limits().get(backend, {}).get("max_per_type") or {})
        for pair in per_type:
            itype, eq, n = pair.partition("=")
            if not eq or not itype or (n and not n.isdigit()):
                raise click.UsageError(f"--max-per-type {pair!r}: expected TYPE=N (TYPE= removes the limit)")
            if n:
                current[itype] = int(n)
            else:
                current.pop(itype, None)
        changes["max_per_type"] = current
    if not changes:
        raise click.UsageError("name a limit to set (see --help)")
    new = client.set_limits(backend, changes)
    if as_json:
        _echo_json(new)
        return
    click.echo(f"Limits of {backend}: {_limits(new)}.")


@limits.command(name="remove", context_settings=CONTEXT)
@click.argument("backend")
def remove_limits(backend: str) -> None:
    """Back to no limits for BACKEND (enabled, any region and type, no cap)."""
    from dstack.api.embedded import connect

    connect().remove_limits(backend)
    click.echo(f"Limits of {backend}: none.")
