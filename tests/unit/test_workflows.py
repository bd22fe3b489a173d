"""`resolve_workflow`: from `.dstack/*.yaml` to job specs, and the messages users see on mistakes."""

from __future__ import annotations

import pytest

from dstack.core.errors import ConfigError
from dstack.core.models import DependencySpec

PREPARE_AND_TRAIN = """
workflows:
  - name: prepare
    image: tensorflow/tensorflow:latest-gpu
    commands:
      - python3 prepare.py
    artifacts:
      - data
    resources:
      v100/gpu: $gpu

  - name: train
    image: tensorflow/tensorflow:latest-gpu
    commands:
      - python3 train.py
    artifacts:
      - checkpoint
    dependencies:
      - prepare:latest
    resources:
      v100/gpu: $gpu
"""

VARIABLES = """
variables:
  global: {}
  prepare:
    gpu: 1
  train:
    gpu: 1
"""


def _error(project, name, overrides=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        project.resolve(name, overrides)
    return info.value


def test_designs_example_resolves_to_one_docker_job(project):
    project.workflows(PREPARE_AND_TRAIN).variables(VARIABLES)
    resolved = project.resolve("prepare", {"gpu": 4}, run_name="lazy-bobcat-1")
    assert resolved.provider == "docker"
    assert resolved.variables == {"gpu": 4}
    assert resolved.overrides == {"gpu": 4}
    [job] = resolved.jobs
    assert job.image == "tensorflow/tensorflow:latest-gpu"
    assert job.commands == ["python3 prepare.py"]
    assert job.artifacts == ["data"]
    assert job.run_name == "lazy-bobcat-1"
    assert len(job.job_id) == 12 and int(job.job_id, 16) >= 0
    assert job.env["GPU"] == "4"
    assert job.env["RUN_NAME"] == "lazy-bobcat-1" and job.env["JOB_ID"] == job.job_id


def test_gpu_short_form_takes_the_variables_type_and_name(project):
    project.workflows(PREPARE_AND_TRAIN).variables(VARIABLES)
    gpu = project.resolve("prepare", {"gpu": 4}).jobs[0].requirements.gpu
    assert gpu.count == 4 and type(gpu.count) is int
    assert gpu.name == "v100"


def test_declared_value_is_used_without_override(project):
    project.workflows(PREPARE_AND_TRAIN).variables(VARIABLES)
    assert project.resolve("train").jobs[0].requirements.gpu.count == 1


def test_dependencies_are_listed_as_written(project):
    project.workflows(PREPARE_AND_TRAIN).variables(VARIABLES)
    resolved = project.resolve("train")
    assert resolved.dependencies == [DependencySpec(ref="prepare:latest")]
    assert resolved.dependency_errors["prepare:latest"].location == ".dstack/workflows.yaml:18:9"


@pytest.mark.parametrize("key", ["dependencies", "depends-on", "deps"])
def test_every_spelling_of_dependencies_is_the_same_key(project, key):
    project.workflows(f"""
        workflows:
          - name: prepare
            commands: [echo]
          - name: train
            commands: [echo]
            {key}:
              - prepare
              - prepare:v1
              - ref: prepare:latest
                artifacts: [data]
    """)
    resolved = project.resolve("train")
    assert resolved.dependencies == [
        DependencySpec(ref="prepare"),
        DependencySpec(ref="prepare:v1"),
        DependencySpec(ref="prepare:latest", artifacts=["data"]),
    ]
    assert resolved.dependency_errors["prepare:v1"].location == ".dstack/workflows.yaml:8:9"


def test_dependency_tag_forms_agree(project):
    project.workflows("""
        workflows:
          - name: train
            commands: [echo]
            depends-on: [":v1", {tag: v2}, {workflow: prepare, tag: v3}]
    """)
    refs = [d.ref for d in project.resolve("train").dependencies]
    assert refs == [":v1", ":v2", "prepare:v3"]


def test_dependencies_and_depends_on_together_are_an_error(project):
    project.workflows("""
        workflows:
          - name: train
            commands: [echo]
            dependencies: [a]
            depends-on: [b]
    """)
    err = _error(project, "train")
    assert "same key" in err.message and err.location == ".dstack/workflows.yaml:5:5"


def test_workflow_depending_on_itself_is_an_error(project):
    project.workflows("""
        workflows:
          - name: train
            commands: [echo]
            depends-on: [train:latest]
    """)
    assert "depends on itself" in _error(project, "train").message


def test_default_provider_is_docker_with_an_image_and_bash_without(project):
    project.workflows("""
        workflows:
          - name: in-image
            image: busybox
            commands: [echo hi]
          - name: on-host
            commands: [echo hi]
          - name: explicit
            provider: bash
            image: busybox
            commands: [echo hi]
    """)
    assert project.resolve("in-image").provider == "docker"
    assert project.resolve("in-image").jobs[0].image == "busybox"
    assert project.resolve("on-host").provider == "bash"
    assert project.resolve("on-host").jobs[0].image is None
    assert project.resolve("explicit").provider == "bash"


def test_unknown_provider_is_an_error_at_its_position(project):
    project.workflows("""
        workflows:
          - name: train
            provider: bsh
            commands: [echo]
    """)
    err = _error(project, "train")
    assert err.message == "unknown provider 'bsh'"
    assert err.hint == "did you mean 'bash'?"
    assert err.location == ".dstack/workflows.yaml:3:15"


def test_bash_workflow_needs_a_command(project):
    project.workflows("""
        workflows:
          - name: train
    """)
    err = _error(project, "train")
    assert "at least one command is required" in err.message
    assert err.location == ".dstack/workflows.yaml:2:5"


def test_docker_provider_needs_an_image(project):
    project.workflows("""
        workflows:
          - name: train
            provider: docker
            commands: [echo]
    """)
    assert _error(project, "train").message == "workflow 'train' is missing 'image'"


@pytest.mark.parametrize(
    ("written", "key", "suggestion", "location"),
    [
        ("comands: [echo]", "comands", "commands", "3:5"),
        ("commands: [echo]\n    resorces: {gpu: 1}", "resorces", "resources", "4:5"),
        ("commands: [echo]\n    resources: {gpu: {count: 1, memroy: 16GB}}", "memroy", "memory", "4:33"),
        ("commands: [echo]\n    resources: {memmory: 16GB}", "memmory", "memory", "4:17"),
    ],
)
def test_unknown_key_is_an_error_with_a_suggestion(project, written, key, suggestion, location):
    project.write("workflows.yaml", f"workflows:\n  - name: train\n    {written}\n")
    err = _error(project, "train")
    assert err.message == f"unknown key '{key}' in workflow 'train'"
    assert err.hint == f"did you mean '{suggestion}'?"
    assert err.location == f".dstack/workflows.yaml:{location}"
    assert err.exit_code == 2


def test_unknown_key_without_a_close_match_lists_the_known_keys(project):
    project.workflows("""
        workflows:
          - name: train
            commands: [echo]
            zzz: 1
    """)
    err = _error(project, "train")
    assert err.hint.startswith("known keys: ") and "commands" in err.hint and "depends-on" in err.hint


@pytest.mark.parametrize(
    ("written", "field", "location"),
    [
        ("ports: many", "'ports'", "4:12"),
        ("ports: 1000", "'ports'", "4:12"),
        ("resources: {memory: lots}", "'resources.memory'", "4:25"),
        ("resources: {memory: -5}", "'resources.memory'", "4:25"),
        ("resources: {memory: .inf}", "'resources.memory'", "4:25"),
        ("resources: {v100/gpu: lots}", "'resources.gpu.count'", "4:16"),
        ("resources: {gpu: true}", "'resources'", "4:16"),
        ("artifacts: [../outside]", "'artifacts'", "4:16"),
        ("artifacts: [~/abs]", "'artifacts'", "4:16"),
        ("artifacts: ['  /proc/x']", "'artifacts'", "4:16"),
        ("working_dir: /abs", "'working_dir'", "4:18"),
        ("cache: ../../etc", "'cache'", "4:12"),
        ("cache: ['~/../x']", "'cache'", "4:12"),
        ("artifacts: [/workflow/out]", "'artifacts'", "4:16"),
        ("artifacts: [/etc]", "'artifacts'", "4:16"),
        ("artifacts: [/opt/../usr]", "'artifacts'", "4:16"),
        ("cache: [/opt]", "'cache'", "4:12"),
        ("artifacts: [out]\n    cache: [./out]", "'cache'", "5:12"),
        ("environment: 5", "'environment'", "4:18"),
    ],
)
def test_wrong_type_is_an_error_at_the_value(project, written, field, location):
    project.write("workflows.yaml", f"workflows:\n  - name: train\n    commands: [echo]\n    {written}\n")
    err = _error(project, "train")
    assert err.message.startswith((f"{field} in workflow 'train': ", f"{field} in workflow 'train' must be "))
    assert "Input should" not in err.message  # pydantic's wording is replaced
    assert err.location == f".dstack/workflows.yaml:{location}"


def test_commands_must_be_a_list_of_text(project):
    project.write("workflows.yaml", "workflows:\n  - name: train\n    commands: {a: b}\n")
    err = _error(project, "train")
    assert err.message == "'commands' in workflow 'train' must be a list"
    assert err.location == ".dstack/workflows.yaml:3:15"


def test_wrong_type_shows_what_was_given(project):
    project.workflows("""
        workflows:
          - name: train
            commands: [echo]
            ports: many
    """)
    assert _error(project, "train").hint == 'got "many"'


def test_unknown_workflow_is_an_error_with_a_suggestion(project):
    project.workflows(PREPARE_AND_TRAIN).variables(VARIABLES)
    err = _error(project, "trian")
    assert err.message == "no workflow named 'trian'"
    assert err.hint == "did you mean 'train'?"
    assert _error(project, "zzz").hint == "workflows: prepare, train"


def test_a_bad_value_from_the_command_line_is_blamed_on_the_option(project):
    project.workflows(PREPARE_AND_TRAIN).variables(VARIABLES)
    err = _error(project, "train", {"gpu": "lots"})
    assert err.message == ("--gpu lots: 'resources.gpu.count' in workflow 'train' takes its value from $gpu, "
                           "and it must be a whole number")
    assert err.hint == "pass another --gpu"
    assert err.location.startswith(".dstack/workflows.yaml:")  # where the variable is used


def test_a_bad_value_from_variables_yaml_names_the_variable(project):
    project.workflows(PREPARE_AND_TRAIN).variables(VARIABLES.replace("gpu: 1", "gpu: lots"))
    err = _error(project, "train")
    assert err.message == ("'resources.gpu.count' in workflow 'train' takes its value from the variable 'gpu', "
                           "and it must be a whole number")
    assert 'got "lots"' in err.hint and "--gpu" in err.hint


def test_a_bad_value_made_with_a_system_variable_is_not_blamed_on_it(project):
    project.write("workflows.yaml", "workflows:\n  - name: train\n    commands: [echo]\n"
                                    "    resources: {memory: lots-$run_name}\n")
    err = _error(project, "train")
    assert "run_name" not in err.message and err.message.startswith("'resources.memory' in workflow 'train'")


def test_a_bad_gpu_count_names_both_forms(project):
    project.workflows(PREPARE_AND_TRAIN).variables(VARIABLES)
    err = _error(project, "train", {"gpu": 1.5})
    assert err.message.endswith("must be a GPU count or {count, name, memory}") or \
        err.message.endswith("must be a whole number"), err.message


def test_undeclared_override_lists_the_declared_variables(project):
    project.workflows(PREPARE_AND_TRAIN).variables(VARIABLES)
    err = _error(project, "train", {"gpus": 4})
    assert err.message == "'train' has no variable 'gpus'"
    assert "--gpu" in err.hint


def test_undefined_variable_outside_commands_is_an_error_at_its_position(project):
    project.workflows("""
        workflows:
          - name: train
            commands: [echo]
            resources:
              gpu: $gpu
    """)
    err = _error(project, "train")
    assert err.message == "undefined variable 'gpu'"
    assert err.location == ".dstack/workflows.yaml:5:12"
    assert "pass it as --gpu VALUE" in err.hint  # and that works:
    assert project.resolve("train", {"gpu": 2}).jobs[0].requirements.gpu.count == 2
    assert _error(project, "train", {"shell": 1}).message == "'train' has no variable 'shell'"


def test_undefined_braced_variable_is_an_error_even_in_commands(project):
    project.workflows("""
        workflows:
          - name: train
            commands:
              - echo ok
              - echo ${{ gpu }}
    """)
    err = _error(project, "train")
    assert err.message == "undefined variable 'gpu'"
    assert err.location == ".dstack/workflows.yaml:5:9"


def test_shell_variables_in_commands_and_env_are_left_for_the_shell(project):
    project.workflows("""
        workflows:
          - name: train
            before_run: [cd $HOME]
            commands:
              - echo $HOME $gpu ${{ gpu }}
            env:
              PATHS: $PATH:/opt
    """).variables("variables:\n  train: {gpu: 2}\n")
    job = project.resolve("train").jobs[0]
    assert job.commands == ["cd $HOME", "echo $HOME 2 2"]
    assert job.env["PATHS"] == "$PATH:/opt"


def test_system_variables_and_variables_as_args(project):
    project.workflows("""
        workflows:
          - name: train
            commands:
              - python train.py $variables_as_args
              - echo $run_name ${{ job_id }} ${{ run.name }}
    """).variables("""
        variables:
          global: {name: my model}
          train: {epochs: 3}
    """)
    resolved = project.resolve("train", {"epochs": 5}, run_name="lazy-bobcat-1")
    job = resolved.jobs[0]
    assert job.commands == [
        "python train.py --name 'my model' --epochs 5",
        f"echo lazy-bobcat-1 {job.job_id} lazy-bobcat-1",
    ]
    assert job.env["NAME"] == "my model" and job.env["EPOCHS"] == "5"


def test_full_gpu_form_and_sizes(project):
    project.workflows("""
        workflows:
          - name: train
            commands: [echo]
            resources:
              cpu: 4
              memory: 16GB
              shm_size: 512MB
              gpu:
                count: 2
                name: A100
                memory: 40GB
    """)
    req = project.resolve("train").jobs[0].requirements
    assert (req.cpu, req.memory_mib, req.shm_size_mib) == (4, 16384, 512)
    assert (req.gpu.count, req.gpu.name, req.gpu.memory_mib) == (2, "A100", 40960)


def test_environment_as_a_list_of_key_value(project):
    project.workflows("""
        workflows:
          - name: train
            commands: [echo]
            environment:
              - A=1
              - B=x=y
              - C
    """)
    env = project.resolve("train").jobs[0].env
    assert (env["A"], env["B"], env["C"]) == ("1", "x=y", "")


def test_environment_map_values_become_text(project):
    project.workflows("""
        workflows:
          - name: train
            commands: [echo]
            environment: {A: 1, B: true, C: null}
    """)
    env = project.resolve("train").jobs[0].env
    assert (env["A"], env["B"], env["C"]) == ("1", "true", "")


def test_before_run_runs_before_commands_and_ports_are_kept(project):
    project.workflows("""
        workflows:
          - name: train
            setup: [pip install -r requirements.txt]
            commands: python train.py
            ports: 2
            working_dir: src/
    """)
    job = project.resolve("train").jobs[0]
    assert job.commands == ["pip install -r requirements.txt", "python train.py"]
    assert (job.ports, job.working_dir) == (2, "src")


def test_workflows_folder_adds_files(project):
    project.workflows("""
        workflows:
          - name: prepare
            commands: [echo]
    """)
    project.write("workflows/eval.yaml", "workflows:\n  - name: eval\n    commands: [echo eval]\n")
    project.write("workflows/notes.txt", "not yaml: [")
    assert project.resolve("eval").jobs[0].commands == ["echo eval"]
    err = _error(project, "evl")
    assert err.hint == "did you mean 'eval'?"


def test_workflow_defined_twice_across_files_is_an_error(project):
    project.workflows("workflows:\n  - name: eval\n    commands: [a]\n")
    project.write("workflows/eval.yaml", "workflows:\n  - name: eval\n    commands: [b]\n")
    err = _error(project, "eval")
    assert "defined twice" in err.message
    assert err.file == ".dstack/workflows/eval.yaml" and err.hint == "also at .dstack/workflows.yaml:2:11"


def test_variables_section_for_an_unknown_workflow_is_an_error(project):
    project.workflows(PREPARE_AND_TRAIN).variables("variables:\n  trian: {gpu: 1}\n")
    err = _error(project, "train")
    assert err.message == "variables for an unknown workflow 'trian'"
    assert err.hint == "did you mean 'train'?"
    assert err.location == ".dstack/variables.yaml:2:3"


def test_missing_workflows_file_says_how_to_start(tmp_path):
    from dstack.config.files import ProjectFiles
    from dstack.config.workflows import resolve_workflow

    with pytest.raises(ConfigError, match="no workflows") as info:
        resolve_workflow(ProjectFiles.read(tmp_path), "train", {}, "r-1")
    assert "dstack init" in info.value.hint


@pytest.mark.parametrize(
    ("text", "message", "location"),
    [
        ("workflow:\n  - name: a\n", "must have the key 'workflows'", "1:1"),
        ("workflows:\n  name: a\n", "'workflows' must be a list", "2:3"),
        ("workflows:\n  - a\n", "each workflow must be a mapping", "2:5"),
        ("workflows:\n  - commands: [a]\n", "a workflow has no 'name'", "2:5"),
        ("workflows: []\nextra: 1\n", "unknown key 'extra'", "2:1"),
        ("workflows:\n  - name: a\n\tcommands: [b]\n", "malformed YAML", "3:1"),
    ],
)
def test_malformed_workflows_file_is_an_error_at_its_position(project, text, message, location):
    project.write("workflows.yaml", text)
    err = _error(project, "a")
    assert message in err.message
    assert err.location == f".dstack/workflows.yaml:{location}"
    assert err.exit_code == 2


def test_misspelled_top_level_key_gets_a_suggestion(project):
    project.write("workflows.yaml", "workflow:\n  - name: a\n")
    assert _error(project, "a").hint == "did you mean 'workflows'?"


def test_each_resolution_gets_a_new_job_id(project):
    project.workflows("workflows:\n  - name: a\n    commands: [echo $job_id]\n")
    first, second = project.resolve("a").jobs[0], project.resolve("a").jobs[0]
    assert first.job_id != second.job_id
    assert first.commands == [f"echo {first.job_id}"]


def test_numbers_in_env_keep_the_text_as_written(project):
    project.workflows("""\
        workflows:
          - name: a
            commands: [x]
            env:
              C: 1.50
              V: 11.10
              N: 7
    """)
    env = project.resolve("a").jobs[0].env
    assert (env["C"], env["V"], env["N"]) == ("1.50", "11.10", "7")


def test_yaml_anchors_and_merge_keys_share_blocks_between_workflows(project):
    project.workflows("""\
        x-defaults: &defaults
          commands: [echo shared]
          resources: {cpu: 2}
        workflows:
          - name: a
            <<: *defaults
          - name: b
            <<: *defaults
            commands: [echo own]
    """)
    a, b = project.resolve("a").jobs[0], project.resolve("b").jobs[0]
    assert a.commands == ["echo shared"] and a.requirements.cpu == 2
    assert b.commands == ["echo own"] and b.requirements.cpu == 2


def test_a_misspelt_key_is_named_before_the_variables_it_breaks(project):
    # under the unknown `comands`, $HOME is no shell's: without this it reads "undefined variable 'HOME'"
    project.workflows("workflows:\n  - name: a\n    comands:\n      - echo $HOME\n")
    err = _error(project, "a")
    assert err.message == "unknown key 'comands' in workflow 'a'" and err.location == ".dstack/workflows.yaml:3:5"
    assert err.hint == "did you mean 'commands'?"


def test_deps_is_no_unknown_key_when_a_variable_is_undefined(project):
    project.workflows("workflows:\n  - name: p\n    commands: [x]\n  - name: a\n    deps: [p]\n"
                      "    commands: [echo]\n    working_dir: ${{ nope }}\n")
    err = _error(project, "a")
    assert err.message.startswith("undefined variable 'nope'"), err.message


@pytest.mark.parametrize(("name", "hint"), [("5", 'quote it: name: "5"'), ("[a]", None)])
def test_a_name_that_is_not_text_is_said_so(project, name, hint):
    project.workflows(f"workflows:\n  - name: {name}\n    commands: [x]\n")
    err = _error(project, "5")
    assert err.message.startswith("a workflow's 'name' must be text") and err.location == ".dstack/workflows.yaml:2:11"
    assert err.hint == hint
