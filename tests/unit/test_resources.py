from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from dstack.core.resources import Gpu, Requirements, RunnerResources, format_mib, missing, parse_size_mib


@pytest.mark.parametrize(
    ("value", "mib"),
    [
        ("16GB", 16384),
        ("16GiB", 16384),
        ("16 gb", 16384),
        ("16G", 16384),
        ("512MB", 512),
        ("1.5GB", 1536),
        ("1TB", 1024 * 1024),
        ("2048KB", 2),
        ("300", 300),
        (2048, 2048),
        (1.5, 1),
        (0, 0),
    ],
)
def test_sizes_are_mib(value, mib):
    assert parse_size_mib(value) == mib


@pytest.mark.parametrize("value", ["lots", "16B", "16 PB", "-1GB", "", True, None, [16], -5, math.inf, math.nan])
def test_what_is_not_a_size_is_a_value_error(value):
    with pytest.raises(ValueError):
        parse_size_mib(value)


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from(["", "M", "MB", "MiB"]))
def test_mib_sizes_read_back_exactly(n, unit):
    assert parse_size_mib(f"{n}{unit}") == n


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["G", "GB", "GiB", "g", "gb"]))
def test_gib_sizes_are_1024_mib(n, unit):
    assert parse_size_mib(f"{n}{unit}") == n * 1024
    assert parse_size_mib(format_mib(n * 1024)) == n * 1024


@given(st.one_of(st.text(max_size=12), st.floats(), st.integers()))
def test_parse_size_mib_gives_a_non_negative_int_or_a_value_error(value):
    try:
        mib = parse_size_mib(value)
    except ValueError:
        return
    assert isinstance(mib, int) and mib >= 0


def test_format_mib():
    assert [format_mib(m) for m in (512, 1024, 16384, 1536)] == ["512MB", "1GB", "16GB", "1.5GB"]


def test_short_gpu_form_names_the_gpu():
    req = Requirements.model_validate({"v100/gpu": 4})
    assert (req.gpu.count, req.gpu.name, req.gpu_count) == (4, "v100", 4)


@pytest.mark.parametrize("gpu", [2, "2", {"count": 2}])
def test_gpu_count_forms(gpu):
    assert Requirements.model_validate({"gpu": gpu}).gpu_count == 2


def test_no_gpu_means_zero():
    assert Requirements().gpu_count == 0


@pytest.mark.parametrize(
    "data",
    [
        {"gpu": True},
        {"gpu": -1},
        {"gpu": "many"},
        {"gpu": {"count": 1, "memroy": "1GB"}},
        {"v100/gpu": 1, "gpu": 1},
        {"cpu": 0},
        {"memory": "lots"},
        {"unknown": 1},
    ],
)
def test_invalid_requirements(data):
    with pytest.raises(ValidationError):
        Requirements.model_validate(data)


def test_cpu_mapping_form():
    assert Requirements.model_validate({"cpu": {"count": 8}}).cpu == 8


def test_describe():
    req = Requirements.model_validate({"cpu": 4, "memory": "16GB", "gpu": {"count": 2, "name": "A100", "memory": "40GB"}})
    assert req.describe() == "4 CPU, 16GB memory, 2 A100 GPU (40GB)"
    assert Requirements().describe() == "no specific resources"


RUNNER = RunnerResources(
    cpus=8, memory_mib=32768, gpus=[Gpu(name="NVIDIA A100-SXM4-40GB", memory_mib=40960)] * 2, docker=True
)


def test_requirements_that_fit_lack_nothing():
    req = Requirements.model_validate({"cpu": 8, "memory": "32GB", "a100/gpu": 2})
    assert missing(req, RUNNER, needs_docker=True) == []


def test_missing_names_everything_the_runner_lacks():
    req = Requirements.model_validate({"cpu": 16, "memory": "64GB", "gpu": {"count": 4, "memory": "80GB"}})
    lacks = missing(req, RunnerResources(cpus=8, memory_mib=32768), needs_docker=True)
    assert lacks == [
        "Docker (the workflow has an image)",
        "16 CPUs (has 8)",
        "64GB memory (has 32GB)",
        "4 GPUs with 80GB (has 0 matching)",
    ]


def test_gpu_name_matches_case_insensitively_as_a_substring():
    assert missing(Requirements.model_validate({"a100/gpu": 1}), RUNNER, False) == []
    assert missing(Requirements.model_validate({"v100/gpu": 1}), RUNNER, False) == ["1 v100 GPU (has 0 matching)"]


def test_runner_describe():
    assert RUNNER.describe() == "8 CPU, 32GB, 2x NVIDIA A100-SXM4-40GB, docker"
