"""`dstack run --help` and `dstack run WORKFLOW --help`: read from the project's files alone, no server."""

from __future__ import annotations

import json
from typing import Any

import click

from dstack.config.files import ProjectFiles
from dstack.config.variables import VARIABLES_FILE

# options of `dstack run` that a variable of the same name must not be mistaken for: it goes after `--`
RUN_OPTIONS = ("tag", "json", "detach", "help", "reproduce")


def print_help(ctx: click.Context, workflow: str | None) -> None:
    if workflow:
        click.echo(provider_help(workflow) or workflow_help(ctx, workflow))
        return
    click.echo(ctx.get_help())
    listing = workflows_listing(ctx)  # after the help: a mistake in the files is their file:line:column error
    if listing:
        click.echo(f"\n{listing}")


def workflows_listing(ctx: click.Context) -> str | None:
    """`dstack run --help` after the command's own help: the project's workflows, when in a project."""
    from dstack.api.repo import find_project
    from dstack.config.workflows import load_workflows

    project = find_project()
    files = ProjectFiles.read(project)
    if not files.workflow_files():
        return None
    entries = load_workflows(files)
    formatter = ctx.make_formatter()
    with formatter.section(f"Workflows of {project}"):
        if entries:
            formatter.write_dl([(e.name, _one_line(e.raw.get("help"))) for e in entries])
        else:
            formatter.write_text("none: the workflows files define no workflow")
    return formatter.getvalue().rstrip()


def provider_help(name: str) -> str | None:
    """`dstack run PROVIDER --help` (2022: a provider run with no workflow), unless the project has a workflow of
    that name: the provider's arguments and the keys they stand for."""
    from importlib.metadata import entry_points

    from dstack.api.repo import find_project
    from dstack.config.workflows import load_workflows

    if not any(ep.name == name for ep in entry_points(group="dstack.providers")):
        return None
    files = ProjectFiles.read(find_project())
    if files.workflow_files() and any(e.name == name for e in load_workflows(files)):
        return None
    from dstack.cli.providers import _keys
    from dstack.providers.base import get_provider

    provider = get_provider(name)
    lines = [provider.usage().replace("usage: ", "Usage: ", 1), "",
             f"  Runs the provider `{name}` with no workflow (the 2022 form); its arguments stand for these keys of "
             "a workflow (`dstack providers` lists every provider's):", ""]
    lines += [f"  {k['key']:<14} {k['help']}" for k in _keys(provider.Spec)]
    return "\n".join(lines)


def workflow_help(ctx: click.Context, workflow: str) -> str:
    """`dstack run WORKFLOW --help`: its help text, its variables (value and where each is declared, or that the
    command line must give it), how to override them, then the options of `dstack run`."""
    from dstack.api.repo import find_project
    from dstack.config.workflows import describe_workflow

    files = ProjectFiles.read(find_project())
    files.require_workflows()
    w = describe_workflow(files, workflow)  # an unknown workflow: the closest name; a broken file: file:line:column
    located = w.entry.located
    formatter = ctx.make_formatter()
    formatter.write_usage(f"{ctx.command_path} {workflow}", "[--NAME VALUE]... [OPTIONS]")
    with formatter.indentation():
        if w.help:
            formatter.write_paragraph()
            formatter.write_text(w.help)
        formatter.write_paragraph()
        line, _ = located.where(w.entry.path + ("name",))
        formatter.write_text(f"Workflow '{workflow}' of {_at(located.file, line)}, provider {w.provider}.")

    rows = [(f"--{name} VALUE", f"default {_shown(d.value)}, from {_at(VARIABLES_FILE, d.at[0])} (under "
                                f"'{d.section}:')") for name, d in w.declared.items()]
    for name, ref in w.required.items():
        line, column = located.where(ref.path)
        rows.append((f"--{name} VALUE", f"required: no file declares it; ${name} is used at "
                                        f"{_at(located.file, line, column)}"))
    with formatter.section("Variables"):
        if rows:
            formatter.write_dl(rows)
        else:
            formatter.write_text(f"none: declare them in .dstack/variables.yaml, under 'global:' (every workflow's) "
                                 f"or '{workflow}:'")
    if rows:
        formatter.write_paragraph()
        with formatter.indentation():
            formatter.write_text(_overriding(workflow, w))
    ctx.command.format_options(ctx, formatter)
    return formatter.getvalue().rstrip()


def _overriding(workflow: str, w) -> str:
    example = [f"--{n} VALUE" for n in w.required]
    example += [f"--{n} {_shown(d.value)}" for n, d in list(w.declared.items())[:1]]
    names = [n for n in (*w.declared, *w.required) if n in RUN_OPTIONS]
    after = (f" A variable named like an option below ({', '.join(names)}) goes after `--`: "
             f"`dstack run {workflow} -- --{names[0]} VALUE`." if names else "")
    return (f"Override a variable with --NAME VALUE (or --NAME=VALUE), e.g. `dstack run {workflow} "
            f"{' '.join(example)}`; the command line wins over the workflow's section, which wins over 'global:'. "
            f"Jobs get each variable as an environment variable too, in upper case.{after}")


def _at(file: str, line: int | None, column: int | None = None) -> str:
    if line is None:
        return file
    return f"{file}:{line}" + (f":{column}" if column else "")


def _shown(value: Any) -> str:
    """A value as one would type it: text as it is (quoted when blanks or nothing would hide it), others as YAML
    writes them in flow style."""
    if isinstance(value, str):
        return value if value and value.strip() == value and "\n" not in value else json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "~"
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else str(value)


def _one_line(text: Any) -> str:
    return " ".join(str(text).split()) if text is not None else ""
