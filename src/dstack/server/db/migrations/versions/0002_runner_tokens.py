"""runner tokens: a runner's identity (the hash of its token), labels, issuer, draining

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04 16:55:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('runner_tokens',
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('labels', sa.JSON(), nullable=False),
    sa.Column('issued_by', sa.String(length=50), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('draining', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('name'),
    sa.UniqueConstraint('token_hash')
    )
    with op.batch_alter_table('runners', schema=None) as batch_op:
        batch_op.add_column(sa.Column('labels', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('version', sa.String(length=50), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('runners', schema=None) as batch_op:
        batch_op.drop_column('version')
        batch_op.drop_column('labels')
    op.drop_table('runner_tokens')
