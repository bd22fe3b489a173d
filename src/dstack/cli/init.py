"""`dstack init`: an example .dstack/ to start from."""

from __future__ import annotations

from pathlib import Path

import click

WORKFLOWS = """\
# Workflows of this project: `dstack run NAME` (`dstack run NAME --help`: its variables).
# `dstack docs` shows the full syntax.
workflows:
  - name: prepare
    help: Writes a small dataset into the artifact `data`
    commands:
      - mkdir -p data
      - echo "prepared with $RUN_NAME" > data/dataset.txt
      - echo "rows=$ROWS" >> data/dataset.txt
      - cat data/dataset.txt
    artifacts:
      - data

  - name: train
    help: Reads the data of prepare:latest, writes a checkpoint
    dependencies:
      - prepare:latest
    commands:
      - mkdir -p checkpoint
      - wc -l data/dataset.txt | tee checkpoint/model.txt
      - echo "trained for $EPOCHS epochs"
    artifacts:
      - checkpoint
"""

VARIABLES = """\
# Variables: `$name` or `${{ name }}` in workflows.yaml, exported to jobs as upper-case env vars,
# overridden on the command line: `dstack run prepare --rows 100`; `dstack docs` shows the full syntax
variables:
  global: {}
  prepare:
    rows: 10
  train:
    epochs: 3
"""


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def init(force: bool) -> None:
    """Write an example .dstack/workflows.yaml and .dstack/variables.yaml (kept if they exist)."""
    root = Path.cwd() / ".dstack"
    root.mkdir(exist_ok=True)
    for name, text in (("workflows.yaml", WORKFLOWS), ("variables.yaml", VARIABLES)):
        path = root / name
        if path.exists() and not force:
            click.echo(f"kept {path.relative_to(Path.cwd())} (exists)")
            continue
        path.write_text(text)
        click.echo(f"wrote {path.relative_to(Path.cwd())}")
    click.echo("Next: dstack run prepare -t latest && dstack run train")
