"""`dstack providers [NAME] [--json]`: the installed providers (built-in ones and packages' alike, from the
entry-point group `dstack.providers`), each with its keys and their help, read from its model."""

from __future__ import annotations

import json

import click

# keys every workflow has: listed once, not under each provider
_COMMON = {"name", "help", "provider", "dependencies", "depends-on", "deps", "retry"}


def _keys(spec) -> list[dict]:
    from dstack.config.schema import InputSchema

    schema = spec.model_json_schema(by_alias=True, schema_generator=InputSchema)
    required = {info.alias or name for name, info in spec.model_fields.items() if info.is_required()}
    out = []
    for key, prop in schema.get("properties", {}).items():
        if key in _COMMON:
            continue
        kinds = [p.get("type") for p in prop.get("anyOf", prop.get("oneOf", [prop]))
                 if p.get("type") not in (None, "null")]
        out.append({"key": key, "type": "/".join(dict.fromkeys(kinds)) or "any", "required": key in required,
                    "help": (prop.get("description") or "").strip()})
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def providers(name: str | None, as_json: bool) -> None:
    """List the installed providers and the keys each takes (`provider: NAME` in a workflow). A provider is a
    package that registers its class under the entry-point group `dstack.providers`, as the built-in ones do."""
    from dstack.config.schema import registered_specs
    from dstack.core.errors import ConfigError, did_you_mean

    specs = {n: (spec, summary) for n, (spec, summary) in registered_specs().items()}
    from dstack.api.repo import find_project
    from dstack.config.custom_providers import custom_providers
    from dstack.config.files import ProjectFiles

    for p in custom_providers(ProjectFiles.read(find_project())):  # the project's own, .dstack/providers.yaml
        specs[p.name] = (p.Spec, f"(.dstack/providers.yaml) {p.Spec.__doc__}")
    if name is not None and name not in specs:
        raise ConfigError(f"no provider '{name}' is installed",
                          hint=did_you_mean(name, specs) or f"installed: {', '.join(specs)}")
    found = [{"name": n, "help": summary or "", "keys": _keys(spec)}
             for n, (spec, summary) in specs.items() if name in (None, n)]
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    for p in found:
        click.echo(f"{p['name']}: {p['help']}")
        width = max((len(k["key"]) for k in p["keys"]), default=0)
        for k in p["keys"]:
            mark = " (required)" if k["required"] else ""
            click.echo(f"  {k['key']:<{width}}  {k['type']}{mark}" + (f"  {k['help']}" if k["help"] else ""))
    if name is None:
        click.echo("\nEvery workflow also has: name, help, provider, depends-on (dependencies, deps), retry.")
