"""A workflow without an image runs on the host of a runner: what it asks for there that it will not get, or
should not (system package installs written for a container), is a warning at file:line:column."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("line", [
    "apt-get install -y ffmpeg", "sudo apt update", "echo x && apt install -y git", "conda install numpy",
    "conda create -n env python=3.10", "yum install -y gcc", "dnf install gcc", "apk add curl",
    "mamba install torch", "(cd x; sudo make install)",
])
def test_system_package_installs_on_the_host_are_warned_of(project, line):
    project.workflows(f"""
        workflows:
          - name: w
            commands:
              - echo first
              - {line}
        """)
    warnings = project.resolve("w").warnings
    assert len(warnings) == 1
    assert warnings[0].startswith(".dstack/workflows.yaml:5:9: warning: workflow 'w' has no `image`, so `")


@pytest.mark.parametrize("line", [
    "pip install -r requirements.txt", "python apt.py", "echo apt-get", "./install.sh", "conda activate env",
    "make sudo-free",
])
def test_ordinary_commands_are_not(project, line):
    project.workflows(f"""
        workflows:
          - name: w
            commands:
              - {line}
        """)
    assert project.resolve("w").warnings == []


def test_in_an_image_nothing_is_warned_of(project):
    project.workflows("""
        workflows:
          - name: w
            image: ubuntu:22.04
            commands: [apt-get install -y git]
            resources:
              shm_size: 8GB
        """)
    assert project.resolve("w").warnings == []


def test_shm_size_on_the_host_is_warned_of_where_it_is_written(project):
    project.workflows("""
        workflows:
          - name: w
            commands: [echo hi]
            resources:
              shm_size: 8GB
        """)
    assert project.resolve("w").warnings == [
        ".dstack/workflows.yaml:5:17: warning: `shm_size` has no effect: workflow 'w' has no `image`, so it runs "
        "on the host, whose /dev/shm is the machine's own; give it an `image` to have shared memory of that size"]
