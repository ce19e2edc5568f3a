"""model registry the workers follow, and merchant edits kept beside the generated listing

* ``model_versions.weights_uri``: where a version's weights are (a directory or ``s3://`` prefix
  under the model store, a hub id, or an open_clip ``ARCH/tag``); NULL for random-init builds,
  which the profile and seed describe. GPU workers build what the active version names.
* ``listings.generated_content``: the verified listing as the pipeline produced it, kept when a
  merchant's edit replaces ``content`` (NULL while the listing is as generated).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("model_versions", sa.Column("weights_uri", sa.Text(), nullable=True))
    op.add_column("listings", sa.Column("generated_content", JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column("listings", "generated_content")
    op.drop_column("model_versions", "weights_uri")
