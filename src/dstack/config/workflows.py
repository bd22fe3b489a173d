"""`.dstack/workflows.yaml` (and `.dstack/workflows/*.yaml`): find a workflow, substitute its
variables, validate it with its provider's model, and make its job specs."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, get_args

from pydantic import ValidationError

from dstack.config.custom_providers import custom_provider
from dstack.config.files import ProjectFiles
from dstack.config.variables import (
    Declared,
    Reference,
    apply_overrides,
    as_env_value,
    declared_variables,
    load_variables,
    references,
    substitute,
    variables_as_args,
)
from dstack.config.yaml_positions import Located, load_text
from dstack.core.errors import ConfigError, did_you_mean
from dstack.core.models import DependencySpec, JobSpec
from dstack.core.names import MAX_WORKFLOW_NAME, BadName, check_text
from dstack.core.names import job_id as new_job_id
from dstack.providers.base import artifact_path, get_provider, relative_path


@dataclass
class WorkflowEntry:
    name: str
    raw: dict
    located: Located
    path: tuple


@dataclass
class ResolvedWorkflow:
    name: str
    provider: str
    variables: dict
    overrides: dict
    dependencies: list[DependencySpec]
    jobs: list[JobSpec]
    help: str | None = None
    # where each dependency was written, to point at it when the server cannot resolve it
    dependency_errors: dict[str, ConfigError] = field(default_factory=dict)
    workflow_names: list[str] = field(default_factory=list)  # all of the project's, for hints
    warnings: list[str] = field(default_factory=list)  # `file:line:column: warning: ...`, lines to show as they are
    entry: WorkflowEntry | None = None
    used: dict[tuple, str] = field(default_factory=dict)  # where a value came from a variable -> its name

    def resource_source(self, what: str) -> tuple[ConfigError | None, str | None, str]:
        """Where the resource `what` (`gpu` for the count, `gpu.name`, `gpu.memory`, `cpu`, `memory`) is written
        (an empty ConfigError that holds the place), the variable that set it if one did, and the key as written
        (`v100/gpu`, `gpu.count`, `memory`)."""
        if self.entry is None:
            return None, None, what
        base = self.entry.path + ("resources",)
        written = self.entry.raw.get("resources")
        written = written if isinstance(written, dict) else {}
        top, _, sub = what.partition(".")
        key = next((k for k in written if isinstance(k, str) and k.endswith("/gpu")), "gpu") if top == "gpu" else top
        path = base + (key,)
        if isinstance(written.get(key), dict):
            path += (sub or ("count" if top in ("gpu", "cpu") else ""),)
        elif sub and key != "gpu":  # `v100/gpu: N` has no memory; its name is the key's
            path = base + (key,)
        label = ".".join(str(p) for p in path[len(base):] if p)
        return self.entry.located.error(path, ""), self.used.get(path), label


def load_workflows(files: ProjectFiles) -> list[WorkflowEntry]:
    files.require_workflows()
    paths = files.workflow_files()
    entries: list[WorkflowEntry] = []
    seen: dict[str, WorkflowEntry] = {}
    for rel in paths:
        located = load_text(files.texts[rel], rel)
        data = located.data
        if data is None:
            continue
        if not isinstance(data, dict) or "workflows" not in data:
            key = next(iter(data), None) if isinstance(data, dict) else None
            raise located.error(
                (key,) if key is not None else (), "the file must have the key 'workflows' (a list)",
                hint=did_you_mean(str(key), ["workflows"]) if key else "start it with 'workflows:'", key=True,
            )
        extra = [k for k in data if k != "workflows" and not str(k).startswith("x-")]
        if extra:
            raise located.error((extra[0],), f"unknown key '{extra[0]}'",
                                hint="the file has one key, 'workflows' (and any keys starting with 'x-', e.g. "
                                     "`x-defaults: &defaults` for blocks that workflows merge with `<<: *defaults`)",
                                key=True)
        items = data["workflows"] or []
        if not isinstance(items, list):
            raise located.error(("workflows",), "'workflows' must be a list; start each workflow with '- name:'")
        for i, item in enumerate(items):
            path = ("workflows", i)
            if not isinstance(item, dict):
                raise located.error(path, "each workflow must be a mapping with at least 'name'")
            name = item.get("name")
            if name is not None and not isinstance(name, str):
                raise located.error(path + ("name",), f"a workflow's 'name' must be text, not {name!r}",
                                    hint=f'quote it: name: "{name}"' if isinstance(name, int | float) else None)
            if not name:
                raise located.error(path, "a workflow has no 'name'", hint="add e.g. 'name: train'")
            _check(located, path + ("name",), name, "the workflow name", MAX_WORKFLOW_NAME)
            if name in seen:
                raise located.error(path + ("name",), f"workflow '{name}' is defined twice",
                                    hint=f"also at {_at(seen[name])}")
            entry = WorkflowEntry(name=name, raw=item, located=located, path=path)
            seen[name] = entry
            entries.append(entry)
    return entries


def _check(located: Located, path: tuple, text: str, what: str, max_length: int | None = None) -> None:
    """A name or path as the rules of core.names want it (one line of printable text), else the error at `path`."""
    try:
        check_text(text, what, max_length)
    except BadName as e:
        raise located.error(path, e.message, hint=e.hint) from None


def _check_artifacts(raw: dict, entry: WorkflowEntry) -> None:
    """Artifact paths (`artifacts: [data]` or `[{path: data}]`, maybe from a variable) are one line each."""
    items = raw.get("artifacts")
    for i, item in enumerate(items if isinstance(items, list) else []):
        path, at = (item.get("path"), (i, "path")) if isinstance(item, dict) else (item, (i,))
        if isinstance(path, str):
            _check(entry.located, entry.path + ("artifacts", *at), path, "the artifact path")


def _at(entry: WorkflowEntry) -> str:
    line, column = entry.located.where(entry.path + ("name",))
    return f"{entry.located.file}:{line}:{column}" if line else entry.located.file


def find_workflow(entries: list[WorkflowEntry], name: str) -> WorkflowEntry:
    for e in entries:
        if e.name == name:
            return e
    names = [e.name for e in entries]
    if not names:
        raise ConfigError(f"no workflow named '{name}': the workflows files define none",
                          hint="add one under 'workflows:' (e.g. '- name: train' and its 'commands'), or run "
                               "`dstack init` in an empty folder for an example")
    raise ConfigError(
        f"no workflow named '{name}'",
        hint=did_you_mean(name, names) or f"workflows: {', '.join(names)}",
    )


def provider_name(raw: dict) -> str:
    p = raw.get("provider")
    if isinstance(p, dict):
        p = p.get("name")
    if p:
        return str(p).split("@")[0]
    return "docker" if raw.get("image") else "bash"


def _validation_error(e: ValidationError, entry: WorkflowEntry, model: type, used: dict[tuple, str] | None = None,
                      overrides: dict | None = None) -> ConfigError:
    """The first error of a workflow's validation (an unknown key first: it often causes the others, as
    `comands` leaves `commands` empty)."""
    return _validation_errors(e, entry, model, used, overrides)[0]


def _validation_errors(e: ValidationError, entry: WorkflowEntry, model: type, used: dict[tuple, str] | None = None,
                       overrides: dict | None = None) -> list[ConfigError]:
    """Every error of a workflow's validation, each at its place in the file; the unknown keys alone when there are
    some (the others are often their consequence)."""
    errors = e.errors()
    unknown = [x for x in errors if x["type"] == "extra_forbidden"]
    return [_one_error(err, entry, model, used or {}, overrides or {}) for err in (unknown or errors)]


def _one_error(err: dict, entry: WorkflowEntry, model: type, used: dict[tuple, str], overrides: dict) -> ConfigError:
    """One pydantic error at its place in the file; when the value came from a variable (`gpu: $gpu`), that
    variable is named, and an override from the command line too."""
    loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and ("[" in x or x.startswith("function-"))))
    path = entry.path + loc
    field_name = ".".join(str(x) for x in loc) or "workflow"
    if err["type"] == "extra_forbidden":
        key = loc[-1]
        known = _known_keys(model, loc[:-1])
        if len(loc) == 1 and key in RETIRED:
            return entry.located.error(path, f"'{key}' in workflow '{entry.name}' was retired: {RETIRED[key]}",
                                       key=True)
        return entry.located.error(
            path, f"unknown key '{key}' in workflow '{entry.name}'",
            hint=did_you_mean(str(key), known) or f"known keys: {', '.join(sorted(known))}", key=True,
        )
    if err["type"] == "missing":
        return entry.located.error(entry.path, f"workflow '{entry.name}' is missing '{field_name}'")
    phrase = _plain(err)  # "must be a whole number"; None: our own validators' sentences
    if loc[-1:] == ("gpu",) and phrase == _PLAIN["dict_type"]:
        phrase = "must be a GPU count or {count, name, memory}"
    msg = err["msg"].removeprefix("Value error, ")
    what = phrase or f"is wrong ({msg})"
    # the value as YAML's flow style writes it: {"a": 1}, ["x"], "text"
    got = f"got {json.dumps(err['input'], ensure_ascii=False, default=str)}" if "input" in err and \
        err["type"] != "value_error" else None
    # `v100/gpu: $gpu` is validated as resources.gpu
    used = {tuple("gpu" if isinstance(k, str) and k.endswith("/gpu") else k for k in p): v for p, v in used.items()}
    variable = next((used[path[:n]] for n in range(len(path), len(entry.path), -1) if path[:n] in used), None)
    if variable is not None and variable in overrides:  # the value came from the command line
        return entry.located.error(
            path, f"--{variable} {as_env_value(overrides[variable])}: '{field_name}' in workflow '{entry.name}' "
                  f"takes its value from ${variable}, and it {what}",
            hint=f"pass another --{variable}")
    if variable is not None:
        return entry.located.error(
            path, f"'{field_name}' in workflow '{entry.name}' takes its value from the variable '{variable}', "
                  f"and it {what}",
            hint=f"{got}; set '{variable}' in .dstack/variables.yaml or pass --{variable} VALUE" if got else None)
    if phrase == _PLAIN["string_type"] and isinstance(err.get("input"), dict) and len(err["input"]) == 1:
        # `- echo step: one`: YAML reads text with ": " in it as a mapping
        (key, value), = err["input"].items()
        line = f"{key}: {value}" if value is not None else f"{key}:"
        return entry.located.error(path, f"'{field_name}' in workflow '{entry.name}' must be text, but YAML read "
                                         f"it as a mapping: a ': ' (or a trailing ':') in it makes one",
                                   hint=f"quote the line: - {json.dumps(line, ensure_ascii=False)}")
    if phrase:
        return entry.located.error(path, f"'{field_name}' in workflow '{entry.name}' {phrase}", hint=got)
    return entry.located.error(path, f"'{field_name}' in workflow '{entry.name}': {msg}", hint=got)


# keys that a workflow once had and that no form takes any more: what to write instead
RETIRED = {
    "template": "the block of February 2022 held image, commands and resources; write them at the workflow's top "
                "level (`image:`, `commands:`, `resources:`)",
    "previous_jobs": "it became `depends-on` (now `dependencies`): `dependencies: [prepare:latest]`",
    "triggers": "runs start with `dstack run WORKFLOW` (or a CI job that calls it)",
    "ssh": "reach a job's ports with `dstack attach RUN` (the ports are forwarded over the server)",
    "registry_auth": "images come from registries the runner's Docker Engine is logged in to (`docker login` there)",
}

_PLAIN = {
    "int_parsing": "must be a whole number", "int_type": "must be a whole number",
    "int_from_float": "must be a whole number", "float_parsing": "must be a number",
    "float_type": "must be a number", "finite_number": "must be a finite number",
    "bool_parsing": "must be true or false", "bool_type": "must be true or false",
    "string_type": "must be text", "list_type": "must be a list", "dict_type": "must be a mapping (key: value)",
    "model_type": "must be a mapping (key: value)", "model_attributes_type": "must be a mapping (key: value)",
}


def _plain(err: dict) -> str | None:
    """pydantic's error as words that follow a field's name (`must be a whole number`), or None."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in _PLAIN:
        return _PLAIN[kind]
    bounds = {"greater_than_equal": ("at least", "ge"), "greater_than": ("more than", "gt"),
              "less_than_equal": ("at most", "le"), "less_than": ("less than", "lt")}
    if kind in bounds and bounds[kind][1] in ctx:
        return f"must be {bounds[kind][0]} {ctx[bounds[kind][1]]}"
    if kind == "literal_error" and "expected" in ctx:
        return f"must be {ctx['expected']}"
    return None


def _known_keys(model: type, loc: tuple) -> list[str]:
    for part in loc:
        if isinstance(part, int):
            continue
        f = model.model_fields.get(part) or next(
            (f for f in model.model_fields.values() if f.alias == part), None)
        ann = getattr(f, "annotation", None)
        models = [a for a in (ann, *get_args(ann)) if hasattr(a, "model_fields")]  # `Model | None` too
        if not models:
            return []
        model = models[0]
    keys = []
    for name, f in model.model_fields.items():
        keys.append(f.alias or name)
        if f.alias:
            keys.append(name)
    if model.__name__ == "Requirements":
        keys.append("<name>/gpu")
    return keys


def _one_dependencies_key(raw: dict, entry: WorkflowEntry) -> dict:
    """`dependencies`, `depends-on` (the 2022 schema's) and `deps` are one key: at most one may be written."""
    spelled = [k for k in ("dependencies", "depends-on", "deps") if k in raw]
    if len(spelled) > 1:
        raise entry.located.error(entry.path + (spelled[1],), f"'{spelled[0]}' and '{spelled[1]}' are the same"
                                  " key; keep one", key=True)
    return {k if k != "deps" else "depends-on": v for k, v in raw.items()}


def _raise_unknown_key(entry: WorkflowEntry) -> None:
    """Raise the error for the first key of the workflow that its provider does not know, if any."""
    try:
        provider = get_provider(provider_name(entry.raw))
        provider.Spec.model_validate(_one_dependencies_key(entry.raw, entry))
    except ValidationError as e:
        if any(x["type"] == "extra_forbidden" for x in e.errors()):
            raise _validation_error(e, entry, provider.Spec) from None
    except ConfigError:
        pass  # an unknown provider: the caller's error stands


DEPENDENCY_KEYS = ["ref", "artifacts", "tag", "workflow", "into"]


def _dependency_artifacts(value: Any, entry: WorkflowEntry, path: tuple) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise entry.located.error(path, "'artifacts' of a dependency is a list of artifact paths")
    for i, a in enumerate(value):
        if isinstance(a, str):
            _check(entry.located, path + (i,), a, "the artifact path")
    try:
        return [artifact_path(a) for a in value]
    except ValueError as e:
        raise entry.located.error(path, str(e)) from None


def _into(value: Any, entry: WorkflowEntry, path: tuple) -> str | None:
    """`into: runs/prepare`: the folder (of the working dir) that the dependency's artifacts are mounted under."""
    if value is None:
        return None
    try:
        return relative_path(value, "into")
    except ValueError as e:
        raise entry.located.error(path, str(e), hint="e.g. `into: inputs/prepare`") from None


def _dependencies(raw: list, entry: WorkflowEntry) -> tuple[list[DependencySpec], dict[str, ConfigError]]:
    deps, where = [], {}
    key = next((k for k in ("dependencies", "depends-on", "deps") if k in entry.raw), "dependencies")
    for i, d in enumerate(raw):
        path = entry.path + (key, i)
        if isinstance(d, str) and d.strip():
            spec = DependencySpec(ref=d.strip())
        elif isinstance(d, dict) and ("ref" in d or "tag" in d or "workflow" in d):
            unknown = [k for k in d if k not in DEPENDENCY_KEYS]
            if unknown:
                raise entry.located.error(path + (unknown[0],), f"unknown key '{unknown[0]}' in a dependency",
                                          hint=did_you_mean(str(unknown[0]), DEPENDENCY_KEYS)
                                          or f"known keys: {', '.join(DEPENDENCY_KEYS)}", key=True)
            ref = d.get("ref") or (f"{d['workflow']}" if "workflow" in d else None)
            if "tag" in d:
                ref = f"{d.get('workflow', entry.name)}:{d['tag']}" if "workflow" in d else f":{d['tag']}"
            spec = DependencySpec(ref=str(ref), artifacts=_dependency_artifacts(d.get("artifacts"), entry,
                                                                                path + ("artifacts",)),
                                  into=_into(d.get("into"), entry, path + ("into",)))
        else:
            raise entry.located.error(path, "a dependency is 'workflow:tag', 'workflow', a run name, "
                                      "or {ref: ..., artifacts: [...]}")
        _check(entry.located, path, spec.ref, "the dependency")
        if spec.ref.count(":") > 1 or spec.ref.endswith(":") or " " in spec.ref:
            raise entry.located.error(path, f"dependency '{spec.ref}' is not 'workflow', 'workflow:tag', ':tag' or "
                                            "a run name", hint="e.g. `prepare:latest`")
        if spec.ref.split(":")[0] == entry.name:
            raise entry.located.error(path, f"workflow '{entry.name}' depends on itself")
        deps.append(spec)
        where[spec.ref] = entry.located.error(path, "")
    return deps, where


# variables never exported under these names: a variable `path` must not break the job's PATH
PROTECTED_ENV = {"PATH", "HOME", "PWD", "SHELL", "USER", "TERM", "HOSTNAME", "LANG"}


def _env_name(variable: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in variable).upper()


def required_variables(entry: WorkflowEntry, declared: dict) -> dict[str, Reference]:
    """The variables `entry` refers to that no file declares, each where it is first written: the command line
    must give them (`--gpu VALUE`), or its run is an error."""
    out: dict[str, Reference] = {}
    for r in references(entry.raw, entry.path):
        if r.required and r.name not in declared:
            out.setdefault(r.name, r)
    return out


@dataclass
class WorkflowVariables:
    """What `dstack run WORKFLOW --help` shows: the workflow, its help text, its declared variables (with where
    each is written) and the variables it needs from the command line."""

    entry: WorkflowEntry
    help: str | None
    declared: dict[str, Declared]
    required: dict[str, Reference]
    provider: str


def describe_workflow(files: ProjectFiles, name: str) -> WorkflowVariables:
    """The workflow `name` and its variables, without resolving it (no provider validation, no job specs)."""
    entries = load_workflows(files)
    entry = find_workflow(entries, name)
    declared = declared_variables(files, name, [e.name for e in entries])
    text = entry.raw.get("help")  # as written, as `dstack run` lists it: its variables are listed beside it
    return WorkflowVariables(entry=entry, help=None if text is None else str(text), declared=declared,
                             required=required_variables(entry, declared), provider=provider_name(entry.raw))


@dataclass
class Validation:
    """What `dstack validate` found: how many workflows, the errors (all of them: several per workflow where its
    provider's model finds several) and the warnings (`file:line:column: warning: ...`)."""

    workflows: int = 0
    errors: list[ConfigError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    failed: set[str] = field(default_factory=set)  # the workflows with errors


def validate_project(files: ProjectFiles) -> Validation:
    """Check every workflow of the project as `dstack run` would (structure, the provider's keys, variable
    references, dependency syntax), with no server and running nothing. A variable that no variables.yaml
    declares is a warning here (the command line may give it) with the `--NAME VALUE` that would."""
    out = Validation()
    try:
        entries = load_workflows(files)
    except ConfigError as e:  # the file itself (its YAML, its top-level keys): nothing more can be read
        out.errors.append(e)
        return out
    out.workflows = len(entries)
    names = [e.name for e in entries]
    for entry in entries:
        try:
            declared = declared_variables(files, entry.name, names)
            missing = required_variables(entry, declared)
            for variable, ref in missing.items():
                line, column = entry.located.where(ref.path)
                where = f"{entry.located.file}:{line}:{column}" if line else entry.located.file
                out.warnings.append(f"{where}: warning: workflow '{entry.name}' uses the variable '{variable}', which "
                                    f"no variables.yaml declares: `dstack run {entry.name} --{variable} VALUE` "
                                    f"must give it")
            found: list[ConfigError] = []
            resolved = resolve_workflow(files, entry.name, {v: "1" for v in missing}, "validate", errors=found)
            # a value from such a variable is the command line's: the stand-in validate gives it is no mistake
            found = [e for e in found if not any(e.message.startswith(f"--{v} 1: ") for v in missing)]
            out.errors += found
            if found:
                out.failed.add(entry.name)
            if resolved is not None:
                out.warnings += resolved.warnings
        except ConfigError as e:
            out.errors.append(e)
            out.failed.add(entry.name)
    # once each (a mistake in variables.yaml is met by every workflow), in the order of the files
    unique = {(e.location, e.message): e for e in out.errors}
    out.errors = sorted(unique.values(), key=lambda e: (e.file or "", e.line or 0, e.column or 0))
    return out


def provider_entry(files: ProjectFiles, name: str, args: list[str]) -> WorkflowEntry | None:
    """`dstack run PROVIDER ARGS` (the 2022 form, no workflow): the workflow those arguments mean, when `name` is
    an installed provider and no workflow of the project has that name."""
    from dstack.providers.base import providers

    if name not in providers() or (files.workflow_files() and name in [e.name for e in load_workflows(files)]):
        return None
    import yaml

    raw = get_provider(name).from_args(list(args))
    located = load_text(yaml.safe_dump({"workflows": [raw]}, sort_keys=False), f"dstack run {name}")
    located.positions, located.key_positions = {}, {}  # a command line has no lines: errors name the command
    return WorkflowEntry(name=name, raw=located.data["workflows"][0], located=located, path=("workflows", 0))


def command_line(files: ProjectFiles, name: str, args: list[str]) -> tuple[dict[str, Any], str]:
    """`dstack run NAME ARGS`: (the variables' overrides, the run's args, `${{ run.args }}`). Only a workflow that
    refers to `run.args` takes arguments that set no variable; `dstack run PROVIDER ARGS`'s are the provider's."""
    from dstack.config.variables import split_cli_args

    if provider_entry(files, name, args) is not None:
        return {}, ""
    if not any("run.args" in t or "run_args" in t for t in files.texts.values()):
        return split_cli_args(args, False, [])
    entries = load_workflows(files)
    entry = find_workflow(entries, name)
    if not re.search(r"\$\{\{\s*run[._]args\s*\}\}|\$run_args\b", json.dumps(entry.raw)):
        return split_cli_args(args, False, [])
    declared = declared_variables(files, name, [e.name for e in entries])
    return split_cli_args(args, True, [*declared, *required_variables(entry, declared)])


def resolve_workflow(files: ProjectFiles, name: str, overrides: dict[str, Any], run_name: str,
                     errors: list[ConfigError] | None = None, run_args: str = "",
                     args: list[str] | None = None) -> ResolvedWorkflow | None:
    """The workflow `name` with its variables substituted, validated by its provider, as job specs. `errors`: the
    provider's model's errors go there, all of them, and None is returned (else the first is raised). `args`: the
    command line, for `dstack run PROVIDER ARGS` (a provider's name that is no workflow's)."""
    by_provider = provider_entry(files, name, args) if args is not None else None
    entries = load_workflows(files) if by_provider is None or files.workflow_files() else []
    entry = by_provider or find_workflow(entries, name)
    declared, _ = load_variables(files, name, [e.name for e in entries])
    variables = apply_overrides(declared, overrides, name, tuple(required_variables(entry, declared)))
    job_id = new_job_id()
    system = {"run_name": run_name, "job_id": job_id, "variables_as_args": variables_as_args(variables),
              "run_args": run_args}
    used: dict[tuple, str] = {}
    try:
        raw = substitute(entry.raw, {**variables, **system}, entry.located, entry.path, used=used)
    except ConfigError:
        _raise_unknown_key(entry)  # `comands: [echo $HOME]`: the typo, not the "undefined variable" it causes
        raise
    used = {path: v for path, v in used.items() if v in variables}  # not run_name & co: nobody sets those
    raw = _one_dependencies_key(raw, entry)
    _check_artifacts(raw, entry)
    for key in ("environment", "env"):  # `C: 1.50` is the text 1.50, not the number 1.5
        if isinstance(raw.get(key), dict):
            texts = entry.located.number_texts
            raw[key] = {k: texts.get(entry.path + (key, k), v) if isinstance(v, int | float) else v
                        for k, v in raw[key].items()}
    pname = provider_name(raw)
    try:
        provider = custom_provider(files, pname) or get_provider(pname)
    except ConfigError as e:
        if e.file:  # a mistake in providers.yaml, at its place
            raise
        raise entry.located.error(entry.path + ("provider",), e.message, hint=e.hint) from None
    try:
        spec = provider.Spec.model_validate(raw)
    except ValidationError as e:
        found = _validation_errors(e, entry, provider.Spec, used, overrides)
        if errors is None:
            raise found[0] from None
        errors += found
        return None
    deps, where = _dependencies(spec.dependencies, entry)
    env = {_env_name(k): as_env_value(v) for k, v in variables.items() if _env_name(k) not in PROTECTED_ENV}
    env.update({"RUN_NAME": run_name, "JOB_ID": job_id})
    jobs = provider.create_jobs(spec, env)
    for i, job in enumerate(jobs):
        job.job_id = job_id if i == 0 else new_job_id()
        job.run_name = run_name
        if i:
            job.env["JOB_ID"] = job.job_id
    return ResolvedWorkflow(name=name, provider=pname, variables=variables, overrides=overrides,
                            dependencies=deps, jobs=jobs, help=spec.help, dependency_errors=where,
                            workflow_names=[e.name for e in entries], warnings=_host_warnings(entry, jobs),
                            entry=entry, used=used)


# commands that change a machine (its packages): written for a container, they would change the runner's host
_SYSTEM_CHANGES = re.compile(r"(?:^|[;&|(]\s*|\bsudo\s+)(?:sudo\s|apt-get\s|apt\s+install|yum\s|dnf\s|apk\s+add|"
                             r"conda\s+(?:install|create)|mamba\s+(?:install|create)|pip3?\s+install\s+.*--system)")


def _host_warnings(entry: WorkflowEntry, jobs: list[JobSpec]) -> list[str]:
    """What a workflow without an image asks for that the host will not give it, or should not: shared memory
    of a size (the host's /dev/shm is the machine's), and commands that install system packages (they would
    change the runner's machine: a workflow written for a container belongs in one)."""
    if any(job.image for job in jobs):
        return []
    warnings = []

    def at(path: tuple) -> str:
        line, column = entry.located.where(path)
        return f"{entry.located.file}:{line}:{column}" if line else entry.located.file

    resources = entry.raw.get("resources")
    if isinstance(resources, dict) and "shm_size" in resources:
        warnings.append(f"{at(entry.path + ('resources', 'shm_size'))}: warning: `shm_size` has no effect: workflow "
                        f"'{entry.name}' has no `image`, so it runs on the host, whose /dev/shm is the machine's "
                        "own; give it an `image` to have shared memory of that size")
    for key in ("before_run", "setup", "commands"):
        lines = entry.raw.get(key)
        for i, line in enumerate([lines] if isinstance(lines, str) else lines if isinstance(lines, list) else []):
            if isinstance(line, str) and _SYSTEM_CHANGES.search(line):
                path = entry.path + ((key,) if isinstance(lines, str) else (key, i))
                warnings.append(f"{at(path)}: warning: workflow '{entry.name}' has no `image`, so `{line.strip()[:80]}` "
                                "runs on the runner's host and changes that machine; give the workflow an "
                                "`image` to run it in a container")
                break
    return warnings
