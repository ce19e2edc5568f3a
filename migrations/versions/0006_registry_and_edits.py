"""model registry the workers follow, and merchant edits kept beside the generated listing

* ``model_versions.weights_uri``: where a version's weights are (a directory or ``s3://`` prefix
  under the model store, a hub id, or an open_clip ``ARCH/tag``); NULL for random-init builds,
  which the profile and seed describe. GPU workers build what the active version names.
* ``listings.generated_content``: the verified listing as the pipeline produced it, kept when a
  merchant's edit replaces ``content`` (NULL while the listing is as generated).
* ``builder_watermarks``: how far a periodic builder (the preference-pair builder) has read its
  input, advanced even by a run that produced nothing. Platform-level, like ``training_datasets``.

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
    op.create_table(
        "builder_watermarks",
        sa.Column("builder", sa.String(64), primary_key=True),
        sa.Column("watermark", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
    )


def downgrade() -> None:
    op.drop_table("builder_watermarks")
    op.drop_column("listings", "generated_content")
    op.drop_column("model_versions", "weights_uri")
