"""`artifact_folders`: the folders of a project that hold outputs, which code capture leaves out."""

from __future__ import annotations

import textwrap

import pytest

from dstack.config.files import ProjectFiles
from dstack.config.outputs import artifact_folders
from dstack.core.errors import ConfigError


def folders(workflows: str, workflow: str | None = None) -> tuple[list[str], list[str]]:
    files = ProjectFiles(texts={".dstack/workflows.yaml": textwrap.dedent(workflows)})
    return artifact_folders(files, workflow)


def test_every_workflows_artifacts_in_both_forms_and_those_of_the_workflow_to_run():
    found = folders("""
        x-defaults: &defaults
          artifacts: [shared/out]
        workflows:
          - name: prepare
            commands: [x]
            artifacts: [data, ./data/, {path: cache/}]
          - name: train
            commands: [x]
            artifacts:
              - path: checkpoint
                mount: true
          - name: merged
            <<: *defaults
            commands: [x]
    """, "train")
    assert found == (["cache", "checkpoint", "data", "shared/out"], ["checkpoint"])


def test_artifacts_are_joined_to_their_working_dir():
    assert folders("""
        workflows:
          - name: a
            working_dir: src/../train
            commands: [x]
            artifacts: [out, logs/run]
    """, "a") == (["train/logs/run", "train/out"], ["train/logs/run", "train/out"])


def test_paths_of_variables_and_paths_outside_the_folder_are_not_folders():
    assert folders("""
        workflows:
          - name: a
            commands: [x]
            artifacts: [$out, "${{ dir }}/x", ckpt-$run_name, /abs/out, ~/out, ../up, 7, {path: 8}, {mount: true},
                        kept]
          - name: b
            working_dir: $wd
            commands: [x]
            artifacts: [lost]
    """) == (["kept"], [])


def test_a_folder_that_is_or_holds_a_working_dir_is_code():
    assert folders("""
        workflows:
          - name: everything
            commands: [x]
            artifacts: [., ./]
          - name: in-src
            working_dir: src
            commands: [x]
            artifacts: [".", out]
          - name: over-src
            commands: [x]
            artifacts: [src, src/out/deeper, other]
    """, "over-src") == (["other", "src/out", "src/out/deeper"], ["other", "src/out/deeper"])


def test_dependencies_are_mounted_under_the_dependents_working_dir():
    assert folders("""
        workflows:
          - name: prepare
            commands: [x]
            artifacts: [data, vocab]
          - name: train
            working_dir: train
            depends-on:
              - prepare:latest
              - {ref: some-run-1, artifacts: [weights]}
              - {workflow: prepare, tag: v1}
              - lazy-bobcat-1
              - ":v2"
            commands: [x]
          - name: eval
            working_dir: eval
            deps: {ref: prepare, artifacts: data}
            commands: [x]
          - name: report
            working_dir: report
            dependencies: prepare
            commands: [x]
    """) == (["data", "eval/data", "report/data", "report/vocab", "train/data", "train/vocab", "train/weights",
              "vocab"], [])


def test_a_project_without_artifacts_has_none_and_a_mistake_is_the_files_error():
    assert folders("workflows:\n  - name: a\n    commands: [x]\n", "a") == ([], [])
    with pytest.raises(ConfigError) as e:
        folders("workflows:\n  - name: a\n    commands: [x\n")
    assert e.value.file == ".dstack/workflows.yaml" and e.value.line
