"""The JSON Schema of `.dstack/workflows.yaml`, generated from the providers' models.

Editors use it for completion, tooltips and squiggles (dstack/docs/workflows.md, `dstack docs`, says how to set
one up).
`scripts/gen_schema.py` writes it to `dstack/schemas/workflows.json`; a unit test fails when that
file no longer matches the models.

Each provider's `Spec` says what a workflow is once validated. A file is what the user writes:
before its variables are substituted and before the models' validators normalise it. This module
adds exactly that difference, each part in one place:
- every value may be a variable reference (`gpu: $gpu`), replaced before validation;
- the forms the models' validators accept or refuse beyond their types (`_FIELD_FORMS`,
  `_MODEL_FORMS`: a validator is code, which no schema generator can read);
- both spellings of an aliased key (`env` and `environment`), as `populate_by_name` accepts both;
- which provider validates a workflow: `provider:`, else `docker` with an `image`, else `bash`;
- short descriptions for tooltips where the models have none.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema

from dstack.core.models import RetryPolicy
from dstack.core.resources import _SIZE, GpuRequirement, Requirements
from dstack.providers.base import CommandsSpec, WorkflowSpec, providers
from dstack.providers.bash import BashSpec
from dstack.providers.docker import DockerSpec
from dstack.providers.jupyter import JupyterSpec
from dstack.providers.python import PythonSpec
from dstack.providers.tensorboard import TensorboardSpec
from dstack.providers.torchrun import TorchrunSpec
from dstack.providers.vscode import CodeSpec

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "schemas" / "workflows.json"
REGENERATE = "python scripts/gen_schema.py"
DIALECT = "http://json-schema.org/draft-07/schema#"  # what editors' YAML support reads best

Schema = dict[str, Any]
_ANNOTATIONS = ("title", "description", "default", "examples", "deprecated")
# our own definitions; a hyphen keeps them apart from pydantic's, which are named after classes
REFERENCE = "variable-reference"
DEPENDENCY = "dependency-mapping"


def _ref(name: str) -> Schema:
    return {"$ref": f"#/$defs/{name}"}


# pydantic checks every `$ref` of a schema it makes against its own definitions: ours are written
# under this key while it runs, and turned into `$ref`s afterwards
_OWN = "$dstack-ref"


def _own(name: str) -> Schema:
    return {_OWN: f"#/$defs/{name}"}


def _own_to_ref(s: Any) -> Any:
    if isinstance(s, dict):
        return {("$ref" if k == _OWN else k): _own_to_ref(v) for k, v in s.items()}
    if isinstance(s, list):
        return [_own_to_ref(v) for v in s]
    return s


def _ignore_case(pattern: str) -> str:
    """`pattern` matching letters of either case: JSON Schema patterns take no flags."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i : i + 2])
            i += 2
            continue
        in_class = True if c == "[" else False if c == "]" else in_class
        if c.lower() != c.upper():
            both = c.lower() + c.upper()
            out.append(both if in_class else f"[{both}]")
        else:
            out.append(c)
        i += 1
    return "".join(out)


_SIZE_PATTERN = _ignore_case(_SIZE.pattern) if _SIZE.flags & re.IGNORECASE else _SIZE.pattern
# a value that is one reference and nothing else (it then takes the variable's own type); see
# dstack.config.variables.substitute
_WHOLE_REFERENCE = r"^\s*(\$[A-Za-z_]\w*|\$\{\{\s*[A-Za-z_][\w.-]*\s*\}\})\s*$"

NULL: Schema = {"type": "null"}
STRING: Schema = {"type": "string"}
SCALAR: Schema = {"type": ["string", "number", "boolean"]}
LINES: Schema = {"type": "array", "items": SCALAR}
SIZE: Schema = {"type": "string", "pattern": _SIZE_PATTERN}
GPU_KEY = "^.+/gpu$"  # `v100/gpu: 2`, read by Requirements._short_forms
MIB: Schema = {"type": "number", "minimum": 0}
RELATIVE_PATH: Schema = {"type": "string", "pattern": r"^\s*[^\s/~]"}
ARTIFACT_PATH: Schema = {"type": "string", "pattern": r"^\s*[^\s~]"}  # relative, or absolute (saved from there)
CACHE_PATH: Schema = {"type": "string", "pattern": r"^\s*([^\s~]|~/)"}  # relative, absolute or in the home

OWN_DEFS: dict[str, Schema] = {
    REFERENCE: {
        "type": "string",
        "pattern": _WHOLE_REFERENCE,
        # a comment, not a description: an editor's tooltip then keeps the key's own description
        "$comment": "A variable ($name or ${{ name }}), replaced by its value (of its own type) before "
        "the workflow is validated. Variables come from .dstack/variables.yaml and `dstack run "
        "WORKFLOW --name VALUE`.",
    },
    DEPENDENCY: {
        "type": "object",
        "description": "A dependency with its options: `ref` (or `workflow` and/or `tag`), and the "
        "artifacts to mount (all of them when omitted).",
        "properties": {
            "ref": {"type": "string", "description": "workflow:tag, workflow (its latest DONE run) or a run name."},
            "workflow": {"type": "string", "description": "A workflow: its latest DONE run, or with `tag`, the "
                         "run so tagged."},
            "tag": {"type": "string", "description": "A tag; with `workflow`, the same as `workflow:tag`."},
            "artifacts": {"anyOf": [{"type": "array", "items": ARTIFACT_PATH}, ARTIFACT_PATH],
                          "description": "The artifacts to mount; all of the run's when omitted."},
            "into": {**RELATIVE_PATH, "description": "Mount the artifacts under this folder of the working dir "
                                                     "instead of at their own paths."},
        },
        "anyOf": [{"required": ["ref"]}, {"required": ["workflow"]}, {"required": ["tag"]}],
        "additionalProperties": False,
    },
}


# --- small operations on schemas -----------------------------------------------------------------

def _split(s: Schema) -> tuple[Schema, Schema]:
    """(validation keywords, annotations) of `s`."""
    return ({k: v for k, v in s.items() if k not in _ANNOTATIONS},
            {k: v for k, v in s.items() if k in _ANNOTATIONS})


def _either(s: Schema, *alternatives: Schema) -> Schema:
    """`s`, or any of `alternatives`; `s`'s annotations stay outside."""
    core, notes = _split(s)
    options = list(core["anyOf"]) if set(core) == {"anyOf"} else [core] if core else []
    for alt in alternatives:
        if alt not in options:
            options.append(alt)
    return {"anyOf": options, **notes} if len(options) > 1 else {**options[0], **notes}


def _instead(s: Schema, *alternatives: Schema) -> Schema:
    """`alternatives` instead of what `s` accepts; `s`'s annotations kept."""
    return _either(_split(s)[1], *alternatives)


def _forbid(s: Schema, *combinations: Schema) -> None:
    """Make `s` refuse objects matching any of `combinations` (e.g. two spellings of one key)."""
    old = s.pop("not", None)
    options = (old["anyOf"] if set(old) == {"anyOf"} else [old]) if old else []
    options += combinations
    s["not"] = {"anyOf": options} if len(options) > 1 else options[0]


def _takes_any_string(s: Schema) -> bool:
    if "anyOf" in s:
        return any(_takes_any_string(x) for x in s["anyOf"])
    if any(k in s for k in ("$ref", _OWN, "enum", "const", "pattern", "format", "minLength", "maxLength", "not")):
        return False
    types = s.get("type")
    return types is None or types == "string" or (isinstance(types, list) and "string" in types)


def _with_references(s: Schema) -> Schema:
    """`s`, or a value that is one variable reference (unless `s` takes any string anyway)."""
    return s if _takes_any_string(s) else _either(s, _own(REFERENCE))


# --- what the validators accept beyond their types ---------------------------------------------

Transform = Callable[[Schema], Schema]

# by (the class that defines the validator, field name); applied base class first. A unit test
# checks that every validator of every model of the schema has its entry here.
_FIELD_FORMS: dict[tuple[type[BaseModel], str], Transform] = {
    # `_deps`: null for none, one dependency for a list of one; the mapping form is parsed by
    # config/workflows.py
    # `_retry`: a count (the limit, on a lost runner) or a boolean; `on` one word for a list of one
    (WorkflowSpec, "retry"): lambda s: _either(s, {"type": "integer", "minimum": 0, "maximum": 100},
                                              {"type": "boolean"}, NULL),
    # and the early 2022 object {repo: {include: [...]}, workflows: [...]}
    (WorkflowSpec, "dependencies"): lambda s: _either(
        {**s, "items": {"anyOf": [STRING, _own(DEPENDENCY)]}}, STRING, _own(DEPENDENCY), NULL,
        {"type": "object", "additionalProperties": False, "minProperties": 1,
         "properties": {"repo": {"type": "object"}, "workflows": {"type": "array", "items": STRING}}}),
    # `_lines`: one line for a list of one; numbers and booleans as text
    (CommandsSpec, "commands"): lambda s: _instead(s, LINES, STRING, NULL),
    (CommandsSpec, "before_run"): lambda s: _instead(s, LINES, STRING, NULL),
    # `_env`: the 0.0.x list ["KEY=VALUE", "KEY"]; any scalar as a value
    (CommandsSpec, "environment"): lambda s: _either(
        {**s, "additionalProperties": _either(SCALAR, NULL)}, {"type": "array", "items": STRING}, NULL),
    # `_artifacts`: {path: ...} for a path; relative to the working folder (not leaving it), or absolute
    (CommandsSpec, "artifacts"): lambda s: _either(
        {**s, "items": {"anyOf": [ARTIFACT_PATH, {"type": "object", "required": ["path"],
                                                  "properties": {"path": ARTIFACT_PATH}}]}}, NULL),
    # `_cache`: {path: ...} for a path; `~/` for the job's home; one path for a list of one
    (CommandsSpec, "cache"): lambda s: _either(
        {**s, "items": {"anyOf": [CACHE_PATH, {"type": "object", "required": ["path"],
                                               "properties": {"path": CACHE_PATH}}]}}, CACHE_PATH, NULL),
    (CommandsSpec, "working_dir"): lambda s: _either({**s, **RELATIVE_PATH}, NULL),
    # `_entrypoint`: shell words in one string, or a list
    (CommandsSpec, "entrypoint"): lambda s: _instead(s, {"type": "array", "items": STRING, "minItems": 1},
                                                     {"type": "string", "minLength": 1}, NULL),
    (CommandsSpec, "resources"): lambda s: _either(s, NULL),
    # Requirements `_labels`: null for none; any scalar as a label's value
    (Requirements, "labels"): lambda s: _either({**s, "additionalProperties": SCALAR}, NULL),
    # BashSpec `_required`: at least one command
    (BashSpec, "commands"): lambda s: _instead(s, {**LINES, "minItems": 1}, STRING),
    # DockerSpec `_image`: a name without blanks
    (DockerSpec, "image"): lambda s: {**s, "pattern": r"^\s*\S+\s*$"},
    # `_sizes`, `_memory`: 16GB, 512MB, or a number of MiB
    (Requirements, "memory_mib"): lambda s: _instead(s, SIZE, MIB, NULL),
    (Requirements, "shm_size_mib"): lambda s: _instead(s, SIZE, MIB, NULL),
    (GpuRequirement, "memory_mib"): lambda s: _instead(s, SIZE, MIB, NULL),
    # PythonSpec `_path`: inside the working folder; `_args`: one string of shell words, or a list of scalars;
    # `_version`: 3, 3.X (a number too: YAML's 3.1 is 3.10)
    (PythonSpec, "file"): lambda s: {**s, **RELATIVE_PATH},
    (PythonSpec, "requirements"): lambda s: _instead(s, RELATIVE_PATH, NULL),
    (PythonSpec, "args"): lambda s: _instead(s, LINES, STRING, NULL),
    # TorchrunSpec `_nproc`: a count, or gpu / cpu / auto
    (TorchrunSpec, "nproc_per_node"): lambda s: _instead(s, {"type": "integer", "minimum": 1},
                                                         {"enum": ["gpu", "cpu", "auto"]}, NULL),
    (JupyterSpec, "requirements"): lambda s: _instead(s, RELATIVE_PATH, NULL),
    (JupyterSpec, "version"): lambda s: _instead(s, {"type": "string", "pattern": r"^\s*3(\.\d{1,2})?\s*$"},
                                                 {"type": "number", "minimum": 3, "maximum": 4}, NULL),
    (PythonSpec, "version"): lambda s: _instead(s, {"type": "string", "pattern": r"^\s*3(\.\d{1,2})?\s*$"},
                                                {"type": "number", "minimum": 3, "maximum": 4}, NULL),
    # CodeSpec `_version`: all of a code-server version (x.y.z: a string); `_python`, `_path` as above
    (CodeSpec, "version"): lambda s: _instead(s, {"type": "string", "pattern": r"^\s*\d+\.\d+\.\d+\s*$"}),
    (CodeSpec, "python"): lambda s: _instead(s, {"type": "string", "pattern": r"^\s*3(\.\d{1,2})?\s*$"},
                                             {"type": "number", "minimum": 3, "maximum": 4}, NULL),
    (CodeSpec, "requirements"): lambda s: _instead(s, RELATIVE_PATH, NULL),
    # BashSpec `_python` (3.X; YAML's 3.1 is 3.10), `_path` (inside the working folder): the 2022 keys
    (BashSpec, "python"): lambda s: _instead(s, {"type": "string", "pattern": r"^\s*3(\.\d{1,2})?\s*$"},
                                             {"type": "number", "minimum": 3, "maximum": 4}, NULL),
    (BashSpec, "requirements"): lambda s: _instead(s, RELATIVE_PATH, NULL),
    # TensorboardSpec `_runs`: one run for a list of one; `_path`: inside the working folder; `_version` as above
    (TensorboardSpec, "runs"): lambda s: _either({**s, "items": {"type": "string", "pattern": r"^\s*[^\s./]"}},
                                                 {"type": "string", "pattern": r"^\s*[^\s./]"}),
    (TensorboardSpec, "logdir"): lambda s: _instead(s, RELATIVE_PATH, NULL),
    (TensorboardSpec, "requirements"): lambda s: _instead(s, RELATIVE_PATH, NULL),
    (TensorboardSpec, "version"): lambda s: _instead(s, {"type": "string", "pattern": r"^\s*3(\.\d{1,2})?\s*$"},
                                                     {"type": "number", "minimum": 3, "maximum": 4}, NULL),
}


def _gpu_count() -> Schema:
    count = GpuRequirement.model_json_schema(mode="validation")["properties"]["count"]
    return _split(count)[0]


def _requirements(s: Schema) -> Schema:
    """`_short_forms`: `<name>/gpu: N`, `gpu: N`, `cpu: {count: N}`."""
    props = s["properties"]
    count = _gpu_count()
    props["gpu"] = _either(props["gpu"], count, {"type": "string", "pattern": r"^\s*\d+\s*$"})
    props["cpu"] = _either(props["cpu"], {"type": "object", "properties": {"count": props["cpu"]}})
    s["patternProperties"] = {GPU_KEY: {**_with_references(count), "description": _GPU_KEY_DESCRIPTION}}
    # `gpu` and `<name>/gpu` together: "some key matches" is "not every key fails to match"
    _forbid(s, {"required": ["gpu"], "not": {"propertyNames": {"not": {"pattern": GPU_KEY}}}})
    return s


def _python(s: Schema) -> Schema:
    """PythonSpec `_no_commands`: it runs `file` (no `commands`), in `image` or `python:VERSION`, not both."""
    s.get("properties", {}).pop("commands", None)
    _forbid(s, {"required": ["image", "docker"], "properties": {"docker": {"const": True}}})
    return s


def _commands(s: Schema) -> Schema:
    """CommandsSpec `_entrypoint_needs_image`: an `entrypoint` comes with an `image` (checked by dstack: the schema
    cannot see which provider's default image applies)."""
    return s


def _ide(s: Schema) -> Schema:
    """JupyterSpec and CodeSpec `_ide_commands`, TensorboardSpec `_served`: it runs the IDE or TensorBoard (no
    `commands`)."""
    s.get("properties", {}).pop("commands", None)
    return s


_MODEL_FORMS: dict[type[BaseModel], Transform] = {Requirements: _requirements, PythonSpec: _python,
                                                  CommandsSpec: _commands, JupyterSpec: _ide, TensorboardSpec: _ide,
                                                  CodeSpec: _ide}

# other spellings of a key, accepted by config/workflows.py before the models see the workflow
_SPELLINGS: dict[tuple[type[BaseModel], str], list[str]] = {(WorkflowSpec, "dependencies"): ["deps"],
                                                            (PythonSpec, "file"): ["script", "python_script"],
                                                            (PythonSpec, "version"): ["python"],
                                                            (JupyterSpec, "version"): ["python"],
                                                            (TensorboardSpec, "version"): ["python"]}

# tooltips, by (model, field), where the model has no description of its own
_DESCRIPTIONS: dict[tuple[type[BaseModel], str], str] = {
    (WorkflowSpec, "name"): "The workflow's name: `dstack run NAME`.",
    (WorkflowSpec, "help"): "A line that describes the workflow.",
    (WorkflowSpec, "retry"): "Start the job again, at most `limit` more times, when its runner is lost (and, with "
                             "`on: [runner-lost, error]`, when it fails): `retry: 2`.",
    (WorkflowSpec, "provider"): "What runs the workflow: a provider's name. Default: `docker` when the "
                                "workflow has an `image`, else `bash`.",
    (WorkflowSpec, "dependencies"): "Runs whose artifacts this workflow needs, mounted read-only at the "
                                    "same paths: `workflow:tag`, `workflow` (its latest DONE run), a run "
                                    "name, or {ref, artifacts}.",
    (CommandsSpec, "commands"): "Shell commands, run one after another by bash (sh in an image); the "
                                "first that fails ends the job.",
    (CommandsSpec, "before_run"): "Commands run before `commands`, in the same shell script.",
    (CommandsSpec, "environment"): "Environment variables of the job: a mapping NAME: value, or a list "
                                   "of NAME=VALUE.",
    (CommandsSpec, "working_dir"): "The folder (relative to the repository) the commands run in; "
                                   "artifacts and dependencies are relative to it.",
    (CommandsSpec, "ports"): "How many free TCP ports the job needs; the runner picks them and exports "
                             "PORT_0, PORT_1, ...",
    (CommandsSpec, "nodes"): "A multi-node run: N jobs placed all at once (JOB_RANK, MASTER_ADDR, MASTER_PORT, "
                             "WORLD_SIZE ...); the master's (rank 0) artifacts are the run's.",
    (CommandsSpec, "artifacts"): "Folders (relative to working_dir, or absolute: /opt/conda/envs/train) saved "
                                 "when the job ends, as immutable artifacts.",
    (CommandsSpec, "cache"): "Folders kept between runs of this workflow on the same runner (~/.cache/pip, "
                             "build): relative to working_dir, in the job's home (~/), or absolute.",
    (CommandsSpec, "entrypoint"): "Replaces the image's entrypoint, and is given the commands as one script: "
                                  "`entrypoint: /bin/bash -c`.",
    (CommandsSpec, "resources"): "What the job needs of a runner: cpu, memory, gpu (or <name>/gpu: N), "
                                 "shm_size, interruptible, labels.",
    (BashSpec, "image"): "A Docker image to run the commands in; without one they run on the runner's host.",
    (DockerSpec, "image"): "The Docker image to run the commands in (its own command when there are none).",
    (Requirements, "cpu"): "The number of CPUs.",
    (Requirements, "memory_mib"): "Memory: 16GB, 512MB (GB = 1024 MB), or a number of MB.",
    (Requirements, "shm_size_mib"): "Size of /dev/shm in the container: 8GB, 512MB, or a number of MB.",
    (Requirements, "gpu"): "GPUs: a count, or {count, name, memory}.",
    (Requirements, "interruptible"): "The job may run on an interruptible (spot) machine.",
    (Requirements, "local"): "Reserved; has no effect yet.",
    (Requirements, "labels"): "Labels the runner must have (`dstack runners add --labels zone=lab`): {zone: lab}.",
    (RetryPolicy, "limit"): "How many more times the job may start again (1 to 100).",
    (RetryPolicy, "on"): "What starts it again: runner-lost (its runner stopped answering or went away), error "
                         "(it failed).",
    (GpuRequirement, "count"): "The number of GPUs.",
    (GpuRequirement, "name"): "A GPU model, matched as a substring of the runner's GPU name (v100, A100).",
    (GpuRequirement, "memory_mib"): "Memory of each GPU: 40GB, or a number of MB.",
}
_GPU_KEY_DESCRIPTION = "GPUs of a model: `v100/gpu: 2` is gpu: {name: v100, count: 2}."


def _description(cls: type[BaseModel], field: str) -> str | None:
    return next((_DESCRIPTIONS[(k, field)] for k in cls.__mro__ if (k, field) in _DESCRIPTIONS), None)


class InputSchema(GenerateJsonSchema):
    """Pydantic's validation schema of a model, widened to what the user may write in the file."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False  # "Depends-On" as a tooltip tells nothing

    def model_schema(self, schema: Any) -> Schema:
        js = super().model_schema(schema)
        js.pop("title", None)  # a class name (DockerSpec) tells a user nothing
        return as_written(schema["cls"], js)


def _forms(cls: type[BaseModel], field: str) -> list[Transform]:
    return [_FIELD_FORMS[(k, field)] for k in reversed(cls.__mro__) if (k, field) in _FIELD_FORMS]


def as_written(cls: type[BaseModel], js: Schema) -> Schema:
    """The schema `js` of `cls` (validation mode, by alias) widened to what a file may say."""
    props: Schema = js.get("properties", {})
    exclusive = []
    for field, info in cls.model_fields.items():
        key = info.alias or field
        if key not in props:
            continue
        s = props[key]
        for transform in _forms(cls, field):
            s = transform(s)
        if isinstance(s.get("default"), dict | type(None)) and "default" in s:
            del s["default"]  # nulls and objects as defaults only clutter completion
        s = _with_references(s)
        text = _description(cls, field)
        if text and "description" not in s:
            s["description"] = text
        props[key] = s
        names = [key]
        by_name = cls.model_config.get("populate_by_name") or cls.model_config.get("validate_by_name")
        if info.alias and info.alias != field and by_name:
            names.append(field)
        names += [n for k in cls.__mro__ for n in _SPELLINGS.get((k, field), [])]
        for other in names[1:]:
            props[other] = {**s, "description": f"Same as `{key}`. " + s.get("description", "")}
        if len(names) > 1:
            exclusive += [{"required": [a, b]} for i, a in enumerate(names) for b in names[i + 1 :]]
            if key in js.get("required", []):  # required under any of its names
                js["required"] = [r for r in js["required"] if r != key]
                js.setdefault("allOf", []).append({"anyOf": [{"required": [n]} for n in names]})
    if exclusive:
        _forbid(js, *exclusive)
    for k in cls.__mro__:
        if k in _MODEL_FORMS:
            js = _MODEL_FORMS[k](js)
    return js


# --- one schema from every provider's ------------------------------------------------------------

def _rename_refs(s: Any, renames: dict[str, str]) -> Any:
    if isinstance(s, dict):
        out = {k: _rename_refs(v, renames) for k, v in s.items()}
        ref = out.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/") and ref[len("#/$defs/"):] in renames:
            out["$ref"] = "#/$defs/" + renames[ref[len("#/$defs/"):]]
        return out
    if isinstance(s, list):
        return [_rename_refs(v, renames) for v in s]
    return s


def merge_defs(into: dict[str, Schema], defs: dict[str, Schema], root: Schema, prefix: str) -> Schema:
    """Add one provider's `defs` to `into`. A definition of the same name and the same content is
    shared; one that differs (two providers' `Requirements` that are different models) is renamed
    `<prefix>.<name>`, and so is any of `defs` that refers to a renamed one. Returns `root` with its
    references renamed to match."""
    renames: dict[str, str] = {}
    while True:
        clash = [n for n, d in defs.items()
                 if n not in renames and n in into and into[n] != _rename_refs(d, renames)]
        if not clash:
            break
        for n in clash:
            new, i = f"{prefix}.{n}", 2
            while new in into or new in renames.values():
                new, i = f"{prefix}.{n}{i}", i + 1
            renames[n] = new
    for n, d in defs.items():
        into[renames.get(n, n)] = _rename_refs(d, renames)
    return _rename_refs(root, renames)


def _escape(text: str) -> str:
    """`text` as a literal in a pattern (JSON Schema's regexes are ECMA 262's: no `\\-`)."""
    return re.sub(r"([.^$*+?()\[\]{}|\\/])", r"\\\1", text)


def _named(names: list[str]) -> Schema:
    """A `provider:` naming one of `names`: NAME, NAME@VERSION (the version is ignored) or {name: NAME}."""
    spelled = {"anyOf": [{"enum": names},
                         {"type": "string", "pattern": f"^({'|'.join(_escape(n) for n in names)})@"}]}
    return {"anyOf": [spelled, {"type": "object", "required": ["name"], "properties": {"name": spelled}}]}


_NO_PROVIDER: Schema = {"properties": {"provider": {"enum": [None, ""]}}}
_NO_IMAGE: Schema = {"properties": {"image": {"enum": [None, ""]}}}
# which provider a workflow without `provider` gets: dstack.config.workflows.provider_name
DEFAULT_PROVIDERS: dict[str, Schema] = {
    "docker": {"allOf": [_NO_PROVIDER, {"required": ["image"], "not": _NO_IMAGE}]},
    "bash": {"allOf": [_NO_PROVIDER, _NO_IMAGE]},
}


def selects(name: str) -> Schema:
    """The workflows that provider `name` validates: those naming it, and those it gets by default."""
    named = {"required": ["provider"], "properties": {"provider": _named([name])}}
    return {"anyOf": [named, DEFAULT_PROVIDERS[name]]} if name in DEFAULT_PROVIDERS else named


def _summary(cls: type) -> str | None:
    doc = cls.__dict__.get("__doc__") or getattr(sys.modules.get(cls.__module__), "__doc__", None)
    return doc.strip().split("\n\n")[0].replace("\n", " ") if doc else None


def registered_specs(builtin_only: bool = False) -> dict[str, tuple[type[BaseModel], str | None]]:
    """{provider name: (its Spec, a line about it)} of the providers registered as entry points."""
    out = {}
    for name, ep in sorted(providers().items()):
        if builtin_only and not ep.value.startswith("dstack.providers."):
            continue
        cls = ep.load()
        out[name] = (cls.Spec, _summary(cls))
    return out


def workflows_schema(specs: dict[str, tuple[type[BaseModel], str | None]] | None = None) -> Schema:
    """The JSON Schema of a workflows file, from `specs` ({provider: (Spec, description)}; by
    default every registered provider's)."""
    specs = registered_specs() if specs is None else specs
    defs: dict[str, Schema] = copy.deepcopy(OWN_DEFS)
    branches = []
    for name, (spec, summary) in specs.items():
        js = _own_to_ref(spec.model_json_schema(by_alias=True, mode="validation", schema_generator=InputSchema))
        js = merge_defs(defs, js.pop("$defs", {}), js, prefix=re.sub(r"[^\w.-]", "_", name))
        js["title"] = f"{name} workflow"
        if summary:
            js["description"] = summary
        key = spec.__name__ if spec.__name__ not in defs else f"{name}.{spec.__name__}"
        defs[key] = js
        # if/then rather than anyOf: an editor then reports the mistakes of the provider that
        # validates the workflow, not those of every provider that does not
        branches.append({"if": selects(name), "then": _ref(key)})
    defs["workflow"] = {
        "type": "object",
        "description": "A workflow: `name`, the keys of its provider (`provider:`; by default `docker` "
                       "when it has an `image`, else `bash`), and common keys such as `depends-on`.",
        "required": ["name"],
        "properties": {"provider": {"anyOf": [_named(sorted(specs)), NULL, {"const": ""}]}},
        "allOf": branches,
    }
    return {
        "$schema": DIALECT,
        "$comment": f"Generated from the providers' models by `{REGENERATE}`; do not edit.",
        "title": "dstack workflows (.dstack/workflows.yaml, .dstack/workflows/*.yaml)",
        "type": "object",
        "required": ["workflows"],
        "additionalProperties": False,
        # blocks to share with YAML anchors: `x-defaults: &defaults`, then `<<: *defaults` in a workflow
        "patternProperties": {"^x-": {}},
        "properties": {
            "workflows": {
                "type": ["array", "null"],
                "description": "The workflows of this file; each is run with `dstack run NAME`.",
                "items": _ref("workflow"),
            },
        },
        "$defs": defs,
    }


def render(schema: Schema) -> str:
    """The text of the shipped file: stable, so that regenerating an unchanged schema changes nothing."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
