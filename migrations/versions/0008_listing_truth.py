"""listing truth (issue 13): what a consumer needs to know to trust a listing's words

Generation now runs in two phases (attributes, verification, then text written from the verified
facts; ``models.listing``), and a listing row records what that produced beside its content:

* ``forced_fields`` (jsonb array): the fields finished past the token budget ("title",
  "description", "attributes.<name>"; forced attributes are dropped, never kept as facts) and
  ``forced_tokens`` (how many tokens that took);
* ``conflicts`` (jsonb array): merchant values of visual attributes the image contradicts with
  high confidence ({attribute, merchant_value, image_value, confidence}), for the merchant;
* ``text_checks`` (jsonb object): what the truth check of the title and description found and
  did (``models.truth``: retried, repaired, found, remaining).

Existing rows get the empty values: they were generated before the flags existed, and say so
with ``text_checks = {}`` (a new row always has ``retried``).

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("listings", sa.Column("forced_fields", JSONB, nullable=False, server_default="[]"))
    op.add_column("listings", sa.Column("forced_tokens", sa.Integer, nullable=False, server_default="0"))
    op.add_column("listings", sa.Column("conflicts", JSONB, nullable=False, server_default="[]"))
    op.add_column("listings", sa.Column("text_checks", JSONB, nullable=False, server_default="{}"))


def downgrade() -> None:
    for column in ("text_checks", "conflicts", "forced_tokens", "forced_fields"):
        op.drop_column("listings", column)
