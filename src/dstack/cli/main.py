"""`dstack`: the command line. Commands are imported only when run, so `dstack --help` stays fast."""

from __future__ import annotations

import importlib
import os
import sys

import click

from dstack import __version__

# pydantic would otherwise scan every installed distribution for plugins on first use (~30 ms)
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

# name -> (module:attribute, one-line help)
COMMANDS = {
    "init": ("dstack.cli.init:init", "Write an example .dstack/ (workflows.yaml, variables.yaml)."),
    "run": ("dstack.cli.run:run", "Run a workflow: provision, stream its logs, save its artifacts."),
    "status": ("dstack.cli.status:status", "Show runs and their jobs."),
    "logs": ("dstack.cli.logs:logs", "Show the output of a run or job."),
    "stop": ("dstack.cli.stop:stop", "Stop a run or job (artifacts saved; --abort: not saved)."),
    "tag": ("dstack.cli.tags:tag", "Name a DONE run, e.g. `dstack tag lazy-bobcat-1 latest`."),
    "untag": ("dstack.cli.tags:untag", "Remove a tag (by TAG, WORKFLOW:TAG or RUN)."),
    "tags": ("dstack.cli.tags:tags", "List tags."),
    "artifacts": ("dstack.cli.artifacts:artifacts", "List, download and compare the artifacts of runs."),
    "prune": ("dstack.cli.prune:prune", "Delete untagged runs nothing tagged depends on, and unused data."),
    "runners": ("dstack.cli.runners:runners", "List runners: the machines that execute jobs."),
    "backends": ("dstack.cli.backends:backends", "List, add, test and remove backends: runners on demand."),
    "limits": ("dstack.cli.backends:limits", "Show and set what each backend may start, and at what price."),
    "server": ("dstack.cli.server:server", "Run the dstack server in the foreground; `server stop` stops it."),
    "docs": ("dstack.cli.docs:docs", "Print the syntax of workflow files, or their JSON Schema."),
    "providers": ("dstack.cli.providers:providers", "List the installed providers and the keys each takes."),
    "validate": ("dstack.cli.validate:validate", "Check every workflow of a project, with no server (a pre-commit hook)."),
}
ALIASES = {"ps": "status"}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        name = ALIASES.get(name, name)
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module), attr)

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as e:
            import difflib

            close = difflib.get_close_matches(args[0], list(COMMANDS), n=1, cutoff=0.7) if args else []
            if close:
                raise click.UsageError(f"no command '{args[0]}'; did you mean '{close[0]}'?", ctx) from None
            raise e

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(n, h) for n, (_, h) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="`dstack docs` shows the full syntax of .dstack/*.yaml; `dstack run WORKFLOW --help` shows a "
                    "workflow's variables and how to set them.")
@click.version_option(__version__, "--version", prog_name="dstack")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """dstack: workflows as code for AI researchers.

    \b
    Describe workflows in .dstack/workflows.yaml, then:
      dstack run prepare --gpu 4     run one (logs streamed, artifacts saved)
      dstack status                  see runs and their jobs
      dstack tag lazy-bobcat-1 latest
      dstack run train               `dependencies: [prepare:latest]` mounts its artifacts
    """
    if ctx.invoked_subcommand not in ("init", "docs"):  # the others may make state there (a server, its token)
        from dstack.core.errors import DstackError
        from dstack.core.home import dstack_home, private_home

        try:
            private_home()
        except OSError as e:
            raise DstackError(f"cannot make DSTACK_HOME ({dstack_home()}) private: {e.strerror}",
                              hint="set DSTACK_HOME to a folder of your own") from None


def main() -> None:
    from dstack.core.errors import DstackError

    code = 0
    for stream in (sys.stdout, sys.stderr):  # an argument that was not UTF-8 may be echoed: never a traceback
        stream.reconfigure(errors="backslashreplace")
    try:
        cli.main(standalone_mode=False, prog_name="dstack")
    except DstackError as e:
        from dstack.cli.output import print_error

        print_error(e)
        code = e.exit_code
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.Abort:
        code = 130
    except click.ClickException as e:  # worded as our own errors are: `error: ...`
        from dstack.cli.output import print_error

        if isinstance(e, click.UsageError) and e.ctx is not None:
            sys.stderr.write(f"{e.ctx.get_usage()}\nTry '{e.ctx.command_path} -h' for help.\n\n")
        print_error(DstackError(e.format_message()))
        code = e.exit_code
    except KeyboardInterrupt:
        code = 130
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    _exit(code)


def _exit(code: int) -> None:
    """Exit now: flushing is all that is left to do, and a normal interpreter shutdown (GC of every module)
    costs ~0.1 s on each command."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # `dstack status | head`
        pass
    os._exit(code)


if __name__ == "__main__":
    main()
