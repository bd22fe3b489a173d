from __future__ import annotations

from importlib.metadata import entry_points

import pytest
from pydantic import ValidationError

from dstack.core.errors import ConfigError
from dstack.providers.base import get_provider, providers, relative_path
from dstack.providers.bash import BashProvider, BashSpec
from dstack.providers.docker import DockerProvider, DockerSpec


def test_built_in_providers_are_registered_as_entry_points():
    registered = {ep.name: ep.value for ep in entry_points(group="dstack.providers")}
    assert registered["bash"] == "dstack.providers.bash:BashProvider"
    assert registered["docker"] == "dstack.providers.docker:DockerProvider"
    assert {"bash", "docker"} <= set(providers())


def test_get_provider_loads_the_class():
    assert isinstance(get_provider("bash"), BashProvider)
    assert isinstance(get_provider("docker"), DockerProvider)


def test_unknown_provider_suggests_a_known_one():
    with pytest.raises(ConfigError, match="unknown provider 'dokcer'") as info:
        get_provider("dokcer")
    assert info.value.hint == "did you mean 'docker'?"
    with pytest.raises(ConfigError) as info:
        get_provider("zzzzzz")
    assert info.value.hint.startswith("known providers: ") and "bash" in info.value.hint


@pytest.mark.parametrize(
    ("value", "norm"),
    [("data", "data"), ("./data/", "data"), ("a/../b", "b"), (" out ", "out"), (".", "."), ("a/./b", "a/b")],
)
def test_relative_paths_are_normalised(value, norm):
    assert relative_path(value, "artifact") == norm


@pytest.mark.parametrize("value", ["/data", "  /data", "~/data", "..", "../x", "a/../../x", "", "  ", None, 3])
def test_paths_outside_the_job_folder_are_rejected(value):
    with pytest.raises(ValueError):
        relative_path(value, "artifact")


def test_bash_job_spec():
    spec = BashSpec.model_validate(
        {
            "name": "train",
            "setup": "pip install x",
            "commands": ["python train.py", 42],
            "env": ["A=1"],
            "ports": 1,
            "artifacts": ["out", {"path": "ckpt"}],
            "resources": {"gpu": 1},
        }
    )
    [job] = BashProvider().create_jobs(spec, {"RUN_NAME": "r-1", "A": "from-variables"})
    assert job.provider == "bash" and job.image is None
    assert job.commands == ["pip install x", "python train.py", "42"]
    assert job.env == {"RUN_NAME": "r-1", "A": "1"}  # the workflow's own env wins
    assert job.artifacts == ["out", "ckpt"]
    assert job.ports == 1 and job.requirements.gpu_count == 1


def test_bash_needs_a_command():
    for data in ({"name": "x"}, {"name": "x", "commands": []}, {"name": "x", "commands": None}):
        with pytest.raises(ValidationError, match="at least one command"):
            BashSpec.model_validate(data)


def test_docker_job_runs_in_its_image():
    spec = DockerSpec.model_validate({"name": "x", "image": " busybox:latest "})
    [job] = DockerProvider().create_jobs(spec, {})
    assert (job.provider, job.image, job.commands) == ("docker", "busybox:latest", [])


@pytest.mark.parametrize("image", ["", "  ", "two words"])
def test_docker_image_must_be_an_image_name(image):
    with pytest.raises(ValidationError, match="image"):
        DockerSpec.model_validate({"name": "x", "image": image})
