"""backends that `dstack backends add` configures (credentials encrypted), their limits, and the instances they
created (until the backend confirms each is gone)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 23:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'backends',
        sa.Column('name', sa.String(length=50), nullable=False),
        sa.Column('kind', sa.String(length=50), nullable=False),
        sa.Column('settings', sa.JSON(), nullable=False),
        sa.Column('secrets', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('name'),
    )
    op.create_table(
        'limits',
        sa.Column('backend', sa.String(length=50), nullable=False),
        sa.Column('limits', sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint('backend'),
    )
    op.create_table(
        'instances',
        sa.Column('backend', sa.String(length=50), nullable=False),
        sa.Column('instance_id', sa.String(length=200), nullable=False),
        sa.Column('runner_name', sa.String(length=100), nullable=False),
        sa.Column('offer', sa.JSON(), nullable=False),
        sa.Column('status', sa.String(length=20), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('terminated_at', sa.DateTime(), nullable=True),
        sa.Column('reason', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('backend', 'instance_id'),
    )
    op.create_index('ix_instances_runner_name', 'instances', ['runner_name'], unique=False)
    op.create_index('ix_instances_status', 'instances', ['status'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_instances_status', table_name='instances')
    op.drop_index('ix_instances_runner_name', table_name='instances')
    op.drop_table('instances')
    op.drop_table('limits')
    op.drop_table('backends')
