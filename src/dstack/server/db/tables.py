"""Database tables. Pydantic models of dstack.core are stored as JSON where they are read whole."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from dstack.core.names import MAX_DEPENDENCY_REF


class Base(DeclarativeBase):
    pass


class RunRow(Base):
    __tablename__ = "runs"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    repo_id: Mapped[str] = mapped_column(String(500))
    workflow: Mapped[str] = mapped_column(String(200))
    provider: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(20))
    submitted_at: Mapped[datetime] = mapped_column(DateTime)
    variables: Mapped[dict] = mapped_column(JSON, default=dict)
    overrides: Mapped[dict] = mapped_column(JSON, default=dict)
    dependencies: Mapped[list] = mapped_column(JSON, default=list)
    code: Mapped[dict] = mapped_column(JSON, default=dict)
    tag_when_done: Mapped[str | None] = mapped_column(String(200), nullable=True)
    reproduces: Mapped[str | None] = mapped_column(String(100), nullable=True)

    jobs: Mapped[list[JobRow]] = relationship(back_populates="run", order_by="JobRow.submitted_at")
    tags: Mapped[list[TagRow]] = relationship(back_populates="run")

    __table_args__ = (Index("ix_runs_repo_submitted", "repo_id", "submitted_at"),)


class JobRow(Base):
    __tablename__ = "jobs"

    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    run_name: Mapped[str] = mapped_column(ForeignKey("runs.name", ondelete="CASCADE"), index=True)
    workflow: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), index=True)
    submitted_at: Mapped[datetime] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    runner_name: Mapped[str | None] = mapped_column(String(100), nullable=True)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    stop_requested: Mapped[str | None] = mapped_column(String(10), nullable=True)
    image_digest: Mapped[str | None] = mapped_column(String(200), nullable=True)
    spec: Mapped[dict] = mapped_column(JSON)
    saved_artifacts: Mapped[list] = mapped_column(JSON, default=list)
    ports: Mapped[list] = mapped_column(JSON, default=list)
    runner_resources: Mapped[dict | None] = mapped_column(JSON, nullable=True)

    run: Mapped[RunRow] = relationship(back_populates="jobs")

    # a runner's unfinished jobs: read by every take, heartbeat and `dstack runners`
    __table_args__ = (Index("ix_jobs_runner_status", "runner_name", "status"),)


class InputRow(Base):
    """Run `run_name` consumed the artifacts of job `job_id` of run `input_run` (its lineage)."""

    __tablename__ = "inputs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_name: Mapped[str] = mapped_column(ForeignKey("runs.name", ondelete="CASCADE"), index=True)
    input_run: Mapped[str] = mapped_column(String(100), index=True)
    job_id: Mapped[str] = mapped_column(String(32))
    ref: Mapped[str] = mapped_column(String(MAX_DEPENDENCY_REF))


class TagRow(Base):
    __tablename__ = "tags"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    repo_id: Mapped[str] = mapped_column(String(500))
    workflow: Mapped[str] = mapped_column(String(200))
    name: Mapped[str] = mapped_column(String(200))
    run_name: Mapped[str] = mapped_column(ForeignKey("runs.name", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)

    run: Mapped[RunRow] = relationship(back_populates="tags")

    __table_args__ = (UniqueConstraint("repo_id", "workflow", "name", name="uq_tags_repo_workflow_name"),)


class RunnerRow(Base):
    __tablename__ = "runners"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(300))
    backend: Mapped[str | None] = mapped_column(String(50), nullable=True)
    status: Mapped[str] = mapped_column(String(20), index=True)
    resources: Mapped[dict] = mapped_column(JSON)
    registered_at: Mapped[datetime] = mapped_column(DateTime)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime)
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    labels: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    version: Mapped[str | None] = mapped_column(String(50), nullable=True)


class RunnerTokenRow(Base):
    """A runner's identity: the hash of its token (the token is shown once, when issued), its labels, who issued
    it (`admin`, or the backend that started the runner), and whether it is being drained."""

    __tablename__ = "runner_tokens"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    labels: Mapped[dict] = mapped_column(JSON, default=dict)
    issued_by: Mapped[str] = mapped_column(String(50))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    draining: Mapped[bool] = mapped_column(Boolean, default=False)


class BackendRow(Base):
    """A backend that `dstack backends add` configured: its settings, and its credentials encrypted with the key
    kept outside the database (services/secrets.py)."""

    __tablename__ = "backends"

    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    kind: Mapped[str] = mapped_column(String(50))
    settings: Mapped[dict] = mapped_column(JSON, default=dict)  # without the secrets
    secrets: Mapped[str | None] = mapped_column(Text, nullable=True)  # a Fernet token of their JSON
    created_at: Mapped[datetime] = mapped_column(DateTime)


class LimitsRow(Base):
    """The limits of a backend (`dstack limits set`): a core.backends.Limits as JSON."""

    __tablename__ = "limits"

    backend: Mapped[str] = mapped_column(String(50), primary_key=True)
    limits: Mapped[dict] = mapped_column(JSON, default=dict)


class InstanceRow(Base):
    """A runner a backend created for this server: from the request until the backend confirms it is gone."""

    __tablename__ = "instances"

    backend: Mapped[str] = mapped_column(String(50), primary_key=True)
    instance_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    runner_name: Mapped[str] = mapped_column(String(100), index=True)
    offer: Mapped[dict] = mapped_column(JSON)  # instance_type, region, spot, price, resources
    status: Mapped[str] = mapped_column(String(20), index=True)  # running | terminating | terminated
    created_at: Mapped[datetime] = mapped_column(DateTime)
    terminated_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)  # why it is being terminated
