"""The JSON Schema of `.dstack/workflows.yaml`: shipped up to date, and in agreement with dstack itself."""

from __future__ import annotations

import json
import re
import textwrap

import jsonschema
import pytest
import yaml
from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticUndefined

from dstack.config import schema as schema_module
from dstack.config.schema import (
    REGENERATE,
    SCHEMA_FILE,
    registered_specs,
    render,
    selects,
    workflows_schema,
)
from dstack.config.variables import _REF
from dstack.config.workflows import provider_name
from dstack.core.errors import ConfigError
from dstack.core.resources import parse_size_mib
from tests.unit.test_workflows import PREPARE_AND_TRAIN as DESIGNS_EXAMPLE  # DESIGN.md's example


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(SCHEMA_FILE.read_text()))


def _valid(validator, text: str) -> bool:
    return validator.is_valid(yaml.safe_load(textwrap.dedent(text)))


def test_shipped_schema_matches_the_models():
    expected = render(workflows_schema(registered_specs(builtin_only=True)))
    shipped = SCHEMA_FILE.read_text() if SCHEMA_FILE.exists() else ""
    assert shipped == expected, (
        f"{SCHEMA_FILE.name} is stale: a provider's model changed. Regenerate it with `{REGENERATE}` "
        "and commit the result."
    )


def test_schema_is_a_valid_draft7_schema_whose_references_resolve(validator):
    jsonschema.Draft7Validator.check_schema(validator.schema)
    text = json.dumps(validator.schema)
    for ref in set(re.findall(r'"\$ref": "#/\$defs/([^"]+)"', text)):
        assert ref in validator.schema["$defs"], ref



WITH_DEPENDS_ON_AND_GPU_MAPPING = """
workflows:
  - name: prepare
    help: Download and split the data set
    commands: python3 prepare.py --out data
    artifacts: [data]
  - name: train
    provider: docker
    image: pytorch/pytorch:2.1.0-cuda12.1-cudnn8-runtime
    working_dir: src
    setup:
      - pip install -r requirements.txt
    commands:
      - python3 train.py --run ${{ run_name }} $variables_as_args
    depends-on:
      - prepare
      - ref: prepare:v1
        artifacts: [data]
    env:
      - WANDB_MODE=offline
      - DEBUG
    ports: 1
    artifacts:
      - checkpoint
      - path: logs
    resources:
      cpu: 8
      memory: 64GB
      shm_size: 8GB
      gpu:
        count: $gpus
        name: A100
        memory: 40GB
      interruptible: true
"""

BASH_WITH_ENV_MAPPING = """
workflows:
  - name: hello
    provider: bash
    before_run: [echo setting up]
    commands:
      - echo "$GREETING, $USER"
      - true
    environment:
      GREETING: hello
      RETRIES: 3
      VERBOSE: false
"""


@pytest.mark.parametrize("text", [DESIGNS_EXAMPLE, WITH_DEPENDS_ON_AND_GPU_MAPPING, BASH_WITH_ENV_MAPPING])
def test_realistic_workflow_files_are_valid(validator, text):
    errors = [e.message for e in validator.iter_errors(yaml.safe_load(text))]
    assert not errors


@pytest.mark.parametrize(
    "body",
    [
        "commands: [x]\n    comands: [y]",  # an unknown key
        "commands: [x]\n    resources: {gpus: 1}",  # an unknown key of resources
        "commands: [x]\n    resources: {gpu: {count: 1, mem: 40GB}}",  # an unknown key of gpu
        "provider: bsh\n    commands: [x]",  # an unknown provider
        "provider: docker\n    commands: [x]",  # docker without an image
        "commands: []",  # bash without commands
        "commands: [x]\n    artifacts: [~/data]",  # an artifact in the job's home (not kept)
        "commands: [x]\n    resources: {memory: 16XB}",  # not a size
        "commands: [x]\n    ports: 65",
        "commands: [x]\n    env: {A: 1}\n    environment: {B: 2}",  # one key spelled twice
    ],
)
def test_mistakes_are_rejected(validator, body):
    assert not _valid(validator, f"workflows:\n  - name: a\n    {body}\n")


def test_the_file_has_only_the_key_workflows(validator):
    assert not _valid(validator, "workflow:\n  - name: a\n    commands: [x]\n")
    assert not _valid(validator, "workflows: []\nvariables: {}\n")
    assert not _valid(validator, "workflows:\n  - commands: [x]\n")  # no name


VARIABLES = """
variables:
  global:
    gpu: 2
    mem: 16GB
    img: ubuntu:22.04
    flag: true
    cmds: [echo one, echo two]
"""

# (a workflow's keys, after `- name: a`): the schema and dstack itself must agree on each
AGREEMENT = [
    "commands: [echo hi]",
    "commands: echo hi",
    "commands: [1, true, echo]",
    "commands: $cmds",
    "commands: []",
    "commands: null",
    "image: ubuntu",
    "image: $img",
    "image: ${{ img }}\n    commands: [ls]",
    "image: ''\n    commands: [ls]",
    "image: 'ubuntu 22'",
    "provider: docker",
    "provider: docker\n    image: ubuntu",
    "provider: {name: docker}\n    image: ubuntu",
    "provider: bash@0.1\n    commands: [x]",
    "provider: bash\n    image: ubuntu\n    commands: [x]",
    "provider: nope\n    commands: [x]",
    "commands: [x]\n    setup: [y]",
    "commands: [x]\n    setup: y",
    "commands: [x]\n    before_run: [y]\n    setup: [z]",
    "commands: [x]\n    env: [A=1, B]",
    "commands: [x]\n    env: {A: 1, B: null, C: $gpu}",
    "commands: [x]\n    env: A=1",
    "commands: [x]\n    working_dir: src",
    "commands: [x]\n    working_dir: /src",
    "commands: [x]\n    ports: 2",
    "commands: [x]\n    ports: $gpu",
    "commands: [x]\n    ports: -1",
    "commands: [x]\n    artifacts: [out, {path: logs}]",
    "commands: [x]\n    artifacts: out",
    "commands: [x]\n    artifacts: [~/out]",
    "commands: [x]\n    artifacts: [/opt/conda/envs/x, {path: /data}]",
    "commands: [x]\n    cache: [~/.cache/pip, build, {path: /opt/x}]",
    "commands: [x]\n    cache: ~/.cache/pip",
    "commands: [x]\n    cache: [~user/x]",
    "commands: [x]\n    dependencies: [{ref: b, into: runs/b}]",
    "commands: [x]\n    dependencies: [{ref: b, into: /abs}]",
    "provider: tensorboard\n    runs: [a-1, 'b:best']\n    logdir: logs",
    "provider: tensorboard\n    runs: a-1\n    python: 3.1",
    "provider: tensorboard\n    logdir: logs",
    "provider: tensorboard\n    runs: [a]\n    commands: [x]",
    "commands: [x]\n    depends-on: [b:latest, b, lazy-bobcat-1]",
    "commands: [x]\n    dependencies: [{ref: b, artifacts: [data]}]",
    "commands: [x]\n    deps: [{workflow: b, tag: v1}]",
    "commands: [x]\n    deps: [b]\n    depends-on: [b]",
    "commands: [x]\n    depends-on: [{artifacts: [data]}]",
    "commands: [x]\n    depends-on: b",
    "commands: [x]\n    resources: {cpu: 4, memory: 16GB}",
    "commands: [x]\n    resources: {cpu: {count: 4}}",
    "commands: [x]\n    resources: {cpu: 0}",
    "commands: [x]\n    resources: {memory: 512, shm_size: 1.5G}",
    "commands: [x]\n    resources: {memory: 16 gib}",
    "commands: [x]\n    resources: {memory: $mem}",
    "commands: [x]\n    resources: {memory: lots}",
    "commands: [x]\n    resources: {gpu: 1}",
    "commands: [x]\n    resources: {gpu: $gpu}",
    "commands: [x]\n    resources: {gpu: {count: 2, name: V100, memory: 16GB}}",
    "commands: [x]\n    resources: {gpu: true}",
    "commands: [x]\n    resources: {a100/gpu: 2}",
    "commands: [x]\n    resources: {a100/gpu: $gpu}",
    "commands: [x]\n    resources: {a100/gpu: {count: 2}}",
    "commands: [x]\n    resources: {a100/gpu: 1, gpu: 1}",
    "commands: [x]\n    resources: {a100/gpux: 1}",
    "commands: [x]\n    resources: {memory: 1GB, memory_mib: 2GB}",
    "commands: [x]\n    resources: {interruptible: $flag}",
    "commands: [x]\n    resources: {gpus: 1}",
    "commands: [x]\n    resources: null",
    "commands: [x]\n    help: Train the model",
    "commands: [x]\n    help: 1",
]


@pytest.mark.parametrize("body", AGREEMENT)
def test_schema_agrees_with_dstack(validator, project, body):
    text = f"workflows:\n  - name: a\n    {body}\n  - name: b\n    commands: [x]\n"
    project.workflows(text).variables(VARIABLES)
    try:
        project.resolve("a")
        accepted = True
    except ConfigError:
        accepted = False
    assert _valid(validator, text) == accepted, f"dstack {'accepts' if accepted else 'rejects'} it"


# where the schema and dstack differ, on purpose or until dstack changes; each closed gap fails
# here (strict xfail), to be moved to AGREEMENT
KNOWN_DIFFERENCES = [
    # the schema is more lenient: dstack's own message is the better one
    ("commands: [x]\n    working_dir: a/../..", "a path that leaves the folder through `..`"),
    ("commands: [x]\n    resources: {a100/gpu: 1, v100/gpu: 1}", "two <name>/gpu keys"),
    ("commands: [x]\n    depends-on: [a:latest]", "a workflow that depends on itself"),
    # the schema is stricter: dstack accepts these, the models do not mean them
    ("commands: [x]\n    ports: '2'", "a quoted number (pydantic's lax mode)"),
    ("commands: [x]\n    resources: {interruptible: 'yes'}", "a string as a boolean (pydantic's lax mode)"),
    ("commands: [x]\n    resources: {/gpu: 1}", "a GPU short form without a name"),
]


@pytest.mark.parametrize(("body", "why"), KNOWN_DIFFERENCES, ids=[why for _, why in KNOWN_DIFFERENCES])
@pytest.mark.xfail(strict=True, raises=AssertionError, reason="a known difference between the schema and dstack")
def test_known_differences(validator, project, body, why):
    test_schema_agrees_with_dstack(validator, project, body)


@pytest.mark.parametrize(
    "workflow",
    [{"image": "ubuntu"}, {"image": ""}, {"image": None}, {}, {"provider": "bash", "image": "x"},
     {"provider": {"name": "docker"}, "image": "x"}, {"provider": "docker@2", "image": "x"}],
)
def test_the_schema_picks_the_provider_dstack_picks(workflow):
    for name in registered_specs(builtin_only=True):
        picked = jsonschema.Draft7Validator(selects(name)).is_valid(workflow)
        assert picked == (name == provider_name(workflow)), name


@pytest.mark.parametrize(
    "text", ["16GB", "16 GiB", "16gb", "1.5T", "512", "512M", "512MB", "2k", " 8G ", "16XB", "GB", "-1GB", "1e3"]
)
def test_the_size_pattern_accepts_what_parse_size_mib_accepts(text):
    try:
        parse_size_mib(text)
        ok = True
    except ValueError:
        ok = False
    assert bool(re.search(schema_module.SIZE["pattern"], text)) == ok


@pytest.mark.parametrize(
    "text", ["$gpu", "${{ gpu }}", "${{gpu}}", " $gpu ", "${{ run.name }}", "$gpu GB", "$$", "$1", "gpu", "${gpu}"]
)
def test_the_reference_pattern_is_a_whole_reference_of_the_substitution(text):
    whole = _REF.fullmatch(text.strip())
    is_reference = bool(whole) and whole.group(0) != "$$" and bool(whole.group(1) or whole.group(2))
    pattern = schema_module.OWN_DEFS[schema_module.REFERENCE]["pattern"]
    assert bool(re.search(pattern, text)) == is_reference


def _models(model: type[BaseModel], seen: set) -> set:
    """`model` and every model its fields hold."""
    from typing import get_args

    if model in seen:
        return seen
    seen.add(model)
    for f in model.model_fields.values():
        stack = [f.annotation]
        while stack:
            t = stack.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                _models(t, seen)
            stack += get_args(t)
    return seen


def test_every_validator_has_its_input_forms_in_the_schema():
    """A validator is code the schema generator cannot read: what it accepts or refuses beyond
    its field's type must be written down in dstack.config.schema."""
    models: set = set()
    for spec, _ in registered_specs(builtin_only=True).values():
        _models(spec, models)
    missing = set()
    for model in models:
        decorators = model.__pydantic_decorators__
        for d in decorators.field_validators.values():
            owner = next(k for k in model.__mro__ if k.__qualname__ == d.func.__qualname__.rsplit(".", 1)[0])
            for field in d.info.fields:
                declared = d.info.json_schema_input_type is not PydanticUndefined
                if (owner, field) not in schema_module._FIELD_FORMS and not declared:
                    missing.add(f"{owner.__name__}.{field} ({d.func.__name__})")
        for d in decorators.model_validators.values():
            owner = next(k for k in model.__mro__ if k.__qualname__ == d.func.__qualname__.rsplit(".", 1)[0])
            if owner not in schema_module._MODEL_FORMS:
                missing.add(f"{owner.__name__} ({d.func.__name__})")
    assert not missing, f"add to _FIELD_FORMS/_MODEL_FORMS in dstack/config/schema.py: {sorted(missing)}"


class Requirements(BaseModel):
    """A third-party provider's own model that happens to share a name with dstack's."""

    model_config = ConfigDict(extra="forbid")
    tpu: int = 0


class NotebookSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    provider: str
    resources: Requirements = Requirements()


def test_providers_from_other_packages_join_the_schema_with_their_own_definitions():
    specs = {**registered_specs(builtin_only=True), "notebook": (NotebookSpec, "`notebook`: Jupyter in the job.")}
    schema = workflows_schema(specs)
    defs = schema["$defs"]
    assert "notebook.Requirements" in defs and defs["Requirements"]["properties"].get("cpu")
    v = jsonschema.Draft7Validator(schema)
    assert v.is_valid({"workflows": [{"name": "nb", "provider": "notebook", "resources": {"tpu": 8}}]})
    assert not v.is_valid({"workflows": [{"name": "nb", "provider": "notebook", "resources": {"gpu": 1}}]})
    assert v.is_valid({"workflows": [{"name": "t", "commands": ["x"], "resources": {"gpu": 1}}]})
    assert not v.is_valid({"workflows": [{"name": "t", "commands": ["x"], "resources": {"tpu": 1}}]})


def test_every_key_has_a_tooltip(validator):
    defs = validator.schema["$defs"]
    for name, d in defs.items():
        for key, prop in {**d.get("properties", {}), **d.get("patternProperties", {})}.items():
            if name != "workflow":
                assert prop.get("description"), f"{name}.{key}: describe it in the model or in _DESCRIPTIONS"
