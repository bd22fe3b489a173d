from __future__ import annotations

import re

import pytest

from dstack.core import names
from dstack.core.models import FINISHED, JobSpec, JobStatus, RunSubmission, run_status
from dstack.core.resources import Requirements

S = JobStatus


def test_finished_and_active_statuses():
    assert {s for s in S if s.finished} == FINISHED == {S.DONE, S.FAILED, S.STOPPED, S.ABORTED}
    assert {s for s in S if s.active} == {S.PROVISIONING, S.RUNNING, S.UPLOADING}


def test_status_prints_as_its_name():
    assert f"{S.DONE}" == "DONE" and str(S.FAILED) == "FAILED"


@pytest.mark.parametrize(
    ("jobs", "run"),
    [
        ([], S.SUBMITTED),
        ([S.DONE], S.DONE),
        ([S.DONE, S.DONE], S.DONE),
        ([S.DONE, S.FAILED], S.FAILED),
        ([S.STOPPED, S.ABORTED], S.ABORTED),
        ([S.FAILED, S.RUNNING], S.RUNNING),  # not over while a job still runs
        ([S.SUBMITTED, S.RUNNING], S.RUNNING),
        ([S.DONE, S.SUBMITTED], S.SUBMITTED),
        ([S.UPLOADING, S.PROVISIONING], S.UPLOADING),
    ],
)
def test_run_status_is_the_worst_of_its_jobs(jobs, run):
    assert run_status(jobs) == run


def test_job_spec_round_trips_through_json():
    spec = JobSpec(
        workflow="train",
        provider="docker",
        image="busybox",
        commands=["echo hi"],
        env={"A": "1"},
        requirements=Requirements.model_validate({"v100/gpu": 2, "memory": "16GB"}),
    )
    back = JobSpec.model_validate_json(spec.model_dump_json())
    assert back == spec
    assert back.requirements.gpu.name == "v100" and back.requirements.memory_mib == 16384


def test_run_submission_round_trips_through_json():
    sub = RunSubmission(
        run_name="lazy-bobcat-1", repo_id="r", workflow="w", provider="bash", jobs=[JobSpec(workflow="w", provider="bash")]
    )
    assert RunSubmission.model_validate_json(sub.model_dump_json()) == sub


def test_defaults_are_not_shared_between_instances():
    a, b = JobSpec(workflow="w", provider="bash"), JobSpec(workflow="w", provider="bash")
    a.env["X"] = "1"
    a.commands.append("x")
    assert b.env == {} and b.commands == []


def test_job_ids_are_12_hex_characters_and_unique():
    ids = {names.job_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{12}", i) for i in ids)


def test_run_name_base_is_adjective_animal():
    for _ in range(50):
        assert re.fullmatch(r"[a-z]+-[a-z]+", names.random_base())


def test_word_lists_have_no_duplicates():
    assert len(set(names.ADJECTIVES)) == len(names.ADJECTIVES)
    assert len(set(names.ANIMALS)) == len(names.ANIMALS)


def test_tokens_are_long_and_url_safe():
    t = names.token()
    assert len(t) >= 40 and re.fullmatch(r"[A-Za-z0-9_-]+", t)
