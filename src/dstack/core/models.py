"""Models shared by the CLI, the server and the runner: the API's vocabulary."""

from __future__ import annotations

import base64
import enum
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, PlainSerializer

from dstack.core.base import Body, Model
from dstack.core.code import CodeSnapshot
from dstack.core.names import (
    MAX_INT64,
    MAX_JOB_ID,
    MAX_PATH,
    MAX_REPO_ID,
    MAX_RUNNER_NAME,
    MAX_TAG,
    MAX_WORKFLOW_NAME,
    check_runner_name,
    check_tag,
    check_text,
)
from dstack.core.resources import Requirements, RunnerResources
from dstack.core.status import FINISHED, JobStatus, run_status  # noqa: F401  (part of the models' API)


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


# the server keeps UTC without a zone (SQLite); the API says so: "2026-11-25T10:42:00Z"
UtcTime = Annotated[datetime, AfterValidator(_utc)]


def _from_base64(v: Any) -> Any:
    return base64.b64decode(v, validate=True) if isinstance(v, str) else v


# raw bytes in Python, base64 text in JSON
Base64Data = Annotated[bytes, BeforeValidator(_from_base64),
                       PlainSerializer(lambda b: base64.b64encode(b).decode(), when_used="json")]

# what the API takes: ints the database can hold, names by the rules of core.names, texts of bounded length
Int64 = Annotated[int, Field(ge=-MAX_INT64 - 1, le=MAX_INT64)]
Count = Annotated[int, Field(ge=0, le=MAX_INT64)]
# a process's exit status: 32 bits (waitpid's int; PostgreSQL's integer column holds no more)
ExitCode = Annotated[int, Field(ge=-2**31, le=2**31 - 1)]
# text that a runner reports of its job (why it failed): a NUL character, which PostgreSQL's text cannot hold,
# is written as the escape \x00, so that the report is never refused for it
ReportedText = Annotated[str, AfterValidator(lambda v: v.replace("\x00", "\\x00"))]
WorkflowName = Annotated[str, Field(min_length=1, max_length=MAX_WORKFLOW_NAME),
                         AfterValidator(lambda v: check_text(v, "the workflow name"))]
TagName = Annotated[str, Field(min_length=1, max_length=MAX_TAG), AfterValidator(check_tag)]
RunnerName = Annotated[str, Field(min_length=1, max_length=MAX_RUNNER_NAME), AfterValidator(check_runner_name)]
RepoId = Annotated[str, Field(max_length=MAX_REPO_ID)]
JobId = Annotated[str, Field(max_length=MAX_JOB_ID)]
Backend = Annotated[str, Field(max_length=50), AfterValidator(lambda v: check_text(v, "the backend"))]
ArtifactPath = Annotated[str, Field(min_length=1, max_length=MAX_PATH),
                         AfterValidator(lambda v: check_text(v, "the artifact path"))]


class DependencySpec(Model):
    """A dependency as written: `workflow:tag`, `workflow` (its latest DONE run) or a run name,
    optionally narrowed to some of its artifacts."""

    ref: str
    artifacts: list[str] | None = None
    into: str | None = None  # mount them under this folder of the working dir (tensorboard: runs/<run>)


class DependencyRef(Model):
    """A resolved dependency: a finished job's saved artifacts."""

    ref: str  # as written: prepare:latest, prepare, lazy-bobcat-1
    run_name: str
    job_id: str
    artifacts: list[str]
    manifests: dict[str, str] = {}  # artifact path -> manifest digest: exactly what was consumed
    into: str | None = None  # the folder (of the working dir) they are mounted under; None: at their own paths


class RetryPolicy(Model):
    """`retry:` of a workflow: how many more times its job starts again, and on what (`runner-lost`: its runner
    stopped answering or went away; `error`: it exited with an error)."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(1, ge=1, le=100)
    on: list[Literal["runner-lost", "error"]] = Field(["runner-lost"], min_length=1)


class JobSpec(Model):
    """Everything a runner needs to execute one job. Produced by a provider, completed by the server."""

    job_id: str = ""
    run_name: str = ""
    workflow: str
    provider: str
    image: str | None = None
    commands: list[str] = []
    entrypoint: list[str] | None = None  # the image's entrypoint replaced: it is given the commands as one script
    env: dict[str, str] = {}
    working_dir: str = "."
    artifacts: list[str] = []  # relative to working_dir, or absolute
    cache: list[str] = []  # folders kept between runs of the workflow on a runner: relative, ~/..., or absolute
    repo_id: str = ""  # the project's (set by the server): with `workflow`, whose cache it is
    ports: int = 0
    requirements: Requirements = Requirements()
    dependencies: list[DependencyRef] = []
    code: CodeSnapshot | None = None
    master: bool = True
    retry: RetryPolicy | None = None
    gpu_indexes: list[int] | None = None  # the runner's GPUs the job was given (by the server, when taken)
    nodes: int = 1  # a multi-node run: how many jobs it has, placed all at once
    rank: int = 0  # this job's rank among them (0: the master)
    delivered: bool = True  # False while a job placed with its run's others waits for its runner's next take
    attempt: int = 1  # counts the starts again (`retry`)
    log_base: int = 0  # where this attempt's output starts in the job's log (earlier attempts' output before it)


class RunRequest(Body):
    """POST /api/runs: run `workflow` of the project whose `.dstack/*.yaml` texts travel in `files` (by path
    relative to the project: `.dstack/workflows.yaml`). The server resolves it, so that the CLI needs neither
    the models nor the providers. `args`: the command line's `--NAME VALUE` overrides as typed;
    `project`: the project's folder on the user's machine, for messages."""

    repo_id: RepoId
    workflow: WorkflowName
    args: list[str] = Field([], max_length=10_000)
    files: dict[str, str] = {}
    project: str = Field(".", max_length=MAX_PATH)
    code: CodeSnapshot | None = None
    tag: TagName | None = None  # tag the run with this once it is DONE


class ArtifactFoldersRequest(Body):
    """POST /api/artifact-folders: which folders of the project whose `.dstack/*.yaml` texts travel in `files`
    hold outputs, which code capture leaves out; `workflow`: the one about to run."""

    files: dict[str, str] = {}
    workflow: WorkflowName | None = None


class ArtifactFolders(Model):
    """`folders`: relative to the project, those that a workflow saves as an artifact or where it mounts a
    dependency's; `saved`: those of them that the request's workflow saves."""

    folders: list[str] = []
    saved: list[str] = []


class RunSubmission(Model):
    """A resolved workflow (variables substituted, jobs made by its provider), to be checked, linked to its
    dependencies and queued: what a RunRequest becomes, and what `--reproduce` makes of a past run."""

    run_name: str
    repo_id: str
    workflow: str
    provider: str
    variables: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    dependencies: list[DependencySpec] = []
    jobs: list[JobSpec]
    code: CodeSnapshot | None = None
    tag: str | None = None  # tag the run with this once it is DONE


class Job(Model):
    job_id: str
    run_name: str
    workflow: str
    status: JobStatus
    submitted_at: UtcTime
    started_at: UtcTime | None = None
    finished_at: UtcTime | None = None
    runner: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    spec: JobSpec | None = None  # left out of listings
    stop_requested: str | None = None  # "stop" | "abort"
    image_digest: str | None = None
    artifacts: list[dict] = []  # saved artifacts: {path, files, size}
    ports: list[int] = []
    hostname: str | None = None  # of the runner, where `ports` can be reached
    runner_resources: RunnerResources | None = None  # what the runner that ran it had
    cost: float | None = None  # USD: its runner's hourly price times the time it ran (None: a runner of no price)


class Run(Model):
    run_name: str
    repo_id: str
    workflow: str
    provider: str
    status: JobStatus
    submitted_at: UtcTime
    variables: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    tags: list[str] = []
    jobs: list[Job] = []
    code: CodeSnapshot | None = None
    dependencies: list[DependencyRef] = []
    used_by: list[str] = []  # runs that consumed this run's artifacts
    reproduces: str | None = None  # the run this one re-ran (`dstack run --reproduce`)
    tag_when_done: str | None = None  # `dstack run -t TAG`: the tag it gets once DONE
    # in the answer to its submission only: lines (`file:line:column: warning: ...`) on what its jobs asked for
    # and will not get, or should not
    warnings: list[str] = []


class Tag(Model):
    name: str
    repo_id: str
    run_name: str
    workflow: str
    created_at: UtcTime


class RunnerStatus(enum.StrEnum):
    READY = "READY"
    BUSY = "BUSY"
    OFFLINE = "OFFLINE"
    TERMINATED = "TERMINATED"


LIVE_RUNNERS = (RunnerStatus.READY.value, RunnerStatus.BUSY.value)  # statuses of a runner that may take jobs


class RunnerInfo(Model):
    name: str
    hostname: str
    backend: str | None = None
    status: RunnerStatus
    resources: RunnerResources
    registered_at: UtcTime
    last_seen_at: UtcTime
    job_id: str | None = None  # the last job it was given
    jobs: list[str] = []  # the jobs it runs now
    free: RunnerResources | None = None  # what of its resources these jobs leave
    labels: dict[str, str] = {}
    version: str | None = None
    draining: bool = False  # `dstack runners remove`: it takes no new job, and goes once its jobs have ended
    price: float | None = None  # USD an hour: of the instance a backend created for it (None: not a backend's)
    offer: str | None = None  # what the backend created, e.g. "aws g5.xlarge, us-east-1, spot, $0.45/h"


Labels = Annotated[dict[Annotated[str, Field(min_length=1, max_length=100)], Annotated[str, Field(max_length=200)]],
                   Field(max_length=50)]


class RunnerTokenRequest(Body):
    """POST /api/runners/tokens (the admin's): a token for a runner of that name (generated when absent)."""

    name: RunnerName | None = None
    labels: Labels = {}


class RunnerToken(Model):
    """A runner's token, in the answer that issues it only: the server keeps only its hash."""

    name: str
    token: str
    labels: dict[str, str] = {}


class RunnerRegistration(Body):
    hostname: str = Field(max_length=300)  # shown as it is sent, escaped (see core.names.printable)
    resources: RunnerResources
    backend: Backend | None = None
    name: RunnerName | None = None  # that of its token; a runner token names its runner
    labels: Labels = {}  # added to its token's
    version: str | None = Field(None, max_length=50)


class Heartbeat(Body):
    job_ids: list[JobId] = Field([], max_length=1024)  # the jobs the runner runs now
    job_id: JobId | None = None  # a runner before 0.4: the one job it runs
    last_taken: JobId | None = None  # the last job the runner was given (so it knows of it)


class SpotNotice(Body):
    """POST /api/runners/NAME/interrupted: the provider takes the runner's spot machine back (its notice)."""

    action: str = Field(max_length=20)  # terminate, stop, hibernate
    time: str | None = Field(None, max_length=50)  # when, as the provider says it


class HeartbeatReply(Model):
    stops: dict[str, str] = {}  # job id -> "stop" | "abort"
    stop: str | None = None  # for a runner before 0.4: that of its one job
    terminate: bool = False
    next_in: float | None = None  # s until the next heartbeat (a server before 0.5 does not say: 1 s)


class SavedArtifact(Model):
    """An artifact folder a job saved, as its runner reports it: the digest of its manifest, its files and bytes."""

    path: ArtifactPath
    manifest: str = Field(max_length=200)
    files: Count = 0
    size: Count = 0


def _saved_artifact(v: Any) -> dict:
    return SavedArtifact.model_validate(v).model_dump()  # kept as the dict the job's row stores


class JobUpdate(Body):
    status: JobStatus
    exit_code: ExitCode | None = None
    reason: ReportedText | None = Field(None, max_length=64 * 1024)
    image_digest: str | None = Field(None, max_length=200)
    # with the final status: what was saved
    artifacts: list[Annotated[dict, AfterValidator(_saved_artifact)]] | None = Field(None, max_length=10_000)
    # with RUNNING: the ports the runner picked (PORT_0, ...)
    ports: list[Annotated[int, Field(ge=1, le=65535)]] | None = Field(None, max_length=64)
    logs: Base64Data | None = None  # with the final status: the job's last output (appended before it)
    logs_offset: Count | None = None  # where `logs` starts in the job's output (a resend adds nothing)
    # with the final status: seconds since the job ended (a report that waited for the server tells when the
    # job ended, not when the report landed; a duration, so that the runner's clock need not agree)
    ended_ago: float | None = Field(None, ge=0, le=10 * 365 * 86400)
