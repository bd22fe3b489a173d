"""inputs.ref holds a dependency as written at its longest: `workflow:tag` (200 + 1 + 200), not 300

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 18:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('inputs', schema=None) as batch_op:
        batch_op.alter_column('ref', existing_type=sa.String(length=300), type_=sa.String(length=401),
                              existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table('inputs', schema=None) as batch_op:
        batch_op.alter_column('ref', existing_type=sa.String(length=401), type_=sa.String(length=300),
                              existing_nullable=False)
