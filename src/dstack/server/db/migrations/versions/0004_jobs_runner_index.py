"""an index on jobs(runner_name, status): every take, heartbeat and `dstack runners` reads a runner's unfinished
jobs, which was a scan of the jobs table

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 20:00:00
"""
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_jobs_runner_status', 'jobs', ['runner_name', 'status'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_jobs_runner_status', table_name='jobs')
