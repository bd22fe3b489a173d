from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from dstack.core.resources import (
    Gpu,
    Requirements,
    RunnerResources,
    format_mib,
    missing,
    most_offered,
    parse_size_mib,
    visible_gpus_env,
)


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
    assert [format_mib(m) for m in (512, 1024, 16384, 1536, 24105, 2047)] == [
        "512 MB", "1 GB", "16 GB", "1.5 GB", "23.5 GB", "1.9 GB"]
    assert all(parse_size_mib(format_mib(m)) <= m for m in range(1, 5000, 7))  # a size read back always fits


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
    assert req.describe() == "4 CPUs, 16 GB memory, 2 A100 GPUs (40 GB)"
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
        "64 GB memory (has 32 GB)",
        "4 GPUs with 80 GB (has 0 matching)",
    ]


def test_gpu_name_matches_case_insensitively_as_a_substring():
    assert missing(Requirements.model_validate({"a100/gpu": 1}), RUNNER, False) == []
    assert missing(Requirements.model_validate({"v100/gpu": 1}), RUNNER, False) == ["1 v100 GPU (has 0 matching)"]


def test_runner_describe():
    assert RUNNER.describe() == "8 CPUs, 32 GB, 2x NVIDIA A100-SXM4-40GB, docker"


def test_most_offered_says_what_would_fit_of_each_resource_none_has():
    small = RunnerResources(cpus=4, memory_mib=8192)
    req = Requirements.model_validate({"cpu": 16, "memory": "64GB", "v100/gpu": 2})
    assert most_offered(req, [RUNNER, small]) == {"gpu": 0, "gpu.name": ["NVIDIA A100-SXM4-40GB"], "cpu": 8,
                                                  "memory": 32768}
    assert most_offered(Requirements.model_validate({"gpu": 3}), [RUNNER, small]) == {"gpu": 2}
    assert most_offered(Requirements.model_validate({"gpu": {"count": 1, "memory": "80GB"}}), [RUNNER]) == {
        "gpu": 0, "gpu.memory": 40960}
    assert most_offered(Requirements.model_validate({"a100/gpu": 2, "cpu": 8}), [RUNNER]) == {}
    assert most_offered(Requirements.model_validate({"gpu": 1}), []) == {"gpu": 0}


def test_counts_of_gpus_are_plural_in_words():
    assert Requirements.model_validate({"gpu": 1}).describe() == "1 GPU"
    assert Requirements.model_validate({"v100/gpu": 3}).describe() == "3 v100 GPUs"


def test_a_gpu_model_is_asked_for_by_its_short_name():
    from dstack.server.services.refusals import _short_name

    assert _short_name("NVIDIA A100-SXM4-80GB") == "a100"
    assert _short_name("NVIDIA H200") == "h200"
    assert _short_name("Tesla V100-PCIE-16GB") == "v100"
    assert _short_name("NVIDIA GeForce RTX 4090") == "rtx"


def test_a_job_on_the_host_sees_only_the_gpus_it_asked_for():
    gpus = [Gpu(name="NVIDIA A100-SXM4-40GB", memory_mib=40960), Gpu(name="NVIDIA H100 80GB HBM3", memory_mib=81559),
            Gpu(name="NVIDIA A100-SXM4-40GB", memory_mib=40960)]

    def visible(resources: dict) -> str:
        env = visible_gpus_env(Requirements.model_validate(resources), gpus)
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # CUDA numbers GPUs as nvidia-smi does
        return env["CUDA_VISIBLE_DEVICES"]

    assert visible({"gpu": 1}) == "0"
    assert visible({"gpu": 3}) == "0,1,2"
    assert visible({"h100/gpu": 1}) == "1"
    assert visible({"a100/gpu": 2}) == "0,2"
    assert visible({"gpu": {"count": 1, "memory": "60GB"}}) == "1"
    assert visible({}) == ""  # asked for none: sees none
    assert visible_gpus_env(Requirements.model_validate({"gpu": 1}), []) == {}  # a machine without GPUs


def test_jobs_share_a_runner_while_its_cpus_memory_and_gpus_allow_and_never_share_a_gpu():
    from dstack.core.resources import Usage, place

    res = RunnerResources(cpus=4, memory_mib=16384, gpus=[Gpu(name="NVIDIA A100", memory_mib=40960)] * 2
                          + [Gpu(name="NVIDIA H100", memory_mib=81559)])
    used = Usage()
    one = Requirements.model_validate({"a100/gpu": 1})
    assert place(one, res, used) == [0]
    used.add(one, [0])
    assert place(one, res, used) == [1]  # not GPU 0: it is taken
    used.add(one, [1])
    assert place(one, res, used) is None  # both A100s are taken; the H100 is not an A100
    assert place(Requirements.model_validate({"gpu": 1}), res, used) == [2]
    assert place(Requirements(), res, used) == []  # a job without GPUs still fits: 2 of 4 CPUs are taken
    used.add(Requirements(), [])
    used.add(Requirements(), [])
    assert place(Requirements(), res, used) is None  # a job that does not say takes one CPU: none left
    small = Usage()
    assert place(Requirements.model_validate({"memory": "20GB"}), res, small) is None
    small.add(Requirements.model_validate({"memory": "12GB"}), [])
    assert place(Requirements.model_validate({"memory": "8GB"}), res, small) is None
    assert place(Requirements.model_validate({"memory": "4GB"}), res, small) == []
    free = used.free(res)
    assert (free.cpus, [g.name for g in free.gpus]) == (0, ["NVIDIA H100"])
