"""`dstack docs [workflows|schema]`: the reference that ships in the package, readable wherever dstack is installed."""

from __future__ import annotations

import sys
from importlib import resources

import click

# topic -> (the file in the package, what it is)
TOPICS = {
    "workflows": ("docs/workflows.md", "the complete syntax of .dstack/*.yaml (markdown)"),
    "schema": ("schemas/workflows.json", "the JSON Schema of workflow files, for editors"),
}


def read_topic(topic: str) -> str:
    return resources.files("dstack").joinpath(TOPICS[topic][0]).read_text(encoding="utf-8")


@click.command(context_settings={"help_option_names": ["-h", "--help"]},
               epilog="\b\nTopics:\n" + "\n".join(f"  {t:<10} {what}" for t, (_, what) in TOPICS.items()))
@click.argument("topic", type=click.Choice(list(TOPICS)), default="workflows")
def docs(topic: str) -> None:
    """Print the reference: the syntax of workflow files (default), or their JSON Schema.

    In a terminal the text goes through a pager; `dstack docs schema > .dstack/workflows.schema.json`
    writes the schema where an editor can find it.
    """
    text = read_topic(topic)
    if sys.stdout.isatty():
        click.echo_via_pager(text)
    else:
        click.echo(text, nl=not text.endswith("\n"))
