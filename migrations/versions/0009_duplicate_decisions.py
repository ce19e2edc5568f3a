"""remembered duplicate decisions (issue 12), trimmed- and centre-image hashes for candidate search

* ``duplicate_decisions``: a merchant's current verdict (``not_duplicate`` / ``confirmed``) on a
  pair of the tenant's images, keyed by their SHA-256 in sorted order (``image_a_sha256 <
  image_b_sha256``), from ``duplicate.reviewed`` events. Keyed by content, not by image id, so a
  decision holds for images stored later too. Tenant-scoped like every table 0005 secured: RLS
  enabled and forced, ``tenant_isolation`` for everyone, ``system_scope`` for ``enrich_worker``
  (0005), ``admin_system_scope`` for ``enrich_admin`` (0007); DML for the worker and admin roles,
  SELECT for ``enrich_reader`` (the catalog views read it).
* ``duplicate_members.method`` admits ``confirmed`` (grouped because a merchant said so).
* ``images.phash_trimmed`` / ``dhash_trimmed``: the perceptual hashes of the image with uniform
  borders trimmed (letterboxing to a square), with HNSW indexes like the plain ones. NULL for rows
  stored before this revision: candidate search then uses their plain hashes.
* ``images.phash_centre`` / ``dhash_centre``: the perceptual hashes of the trimmed image's central
  region (a re-coloured background), indexed and NULL for older rows the same way.
* ``catalog.duplicate_groups`` gains a ``decisions`` column (every current decision that involves
  a member) and a ``decision`` per member (its pair with the representative); the old columns stay
  as they were. New view ``catalog.duplicate_decisions``: one row per decided pair, with the image
  ids and products on each side and whether the two share a group now.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import BIT
from sqlalchemy.dialects.postgresql import UUID

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

WORKER, READER, ADMIN = "enrich_worker", "enrich_reader", "enrich_admin"
TABLE = "duplicate_decisions"
# Tenant-scoped tables this revision adds (secured here, as 0005 secured the earlier ones).
TENANT_SCOPED_ADDED = (TABLE,)
# Nullable bit(64) columns of ``images`` this revision adds, each with an HNSW Hamming index.
HASH_COLUMNS_ADDED = ("phash_trimmed", "dhash_trimmed", "phash_centre", "dhash_centre")

TENANT_PREDICATE = "tenant_id = current_setting('enrich.tenant_id', true)"
SYSTEM_PREDICATE = "current_setting('enrich.scope', true) = 'system'"

_PRODUCTS_OF = """(SELECT coalesce(jsonb_agg(DISTINCT p.external_id), '[]'::jsonb)
                        FROM public.product_images pi
                        JOIN public.products p ON p.id = pi.product_id AND p.tenant_id = pi.tenant_id
                        WHERE pi.image_id = {image} AND pi.tenant_id = {tenant})"""

_DECISION_JSON = """jsonb_build_object(
               'image_a_sha256', d.image_a_sha256, 'image_b_sha256', d.image_b_sha256,
               'decision', d.decision, 'occurred_at', d.occurred_at, 'reviewer', d.reviewer)"""

_MEMBER_DECISION = """,
           'decision', (SELECT d.decision FROM public.duplicate_decisions d
                        WHERE d.tenant_id = g.tenant_id
                          AND d.image_a_sha256 = least(mi.sha256 COLLATE "C", ri.sha256 COLLATE "C")
                          AND d.image_b_sha256 = greatest(mi.sha256 COLLATE "C", ri.sha256 COLLATE "C"))"""

_DECISIONS_COLUMN = f""",
       (SELECT coalesce(jsonb_agg({_DECISION_JSON} ORDER BY d.image_a_sha256, d.image_b_sha256), '[]'::jsonb)
        FROM public.duplicate_decisions d
        WHERE d.tenant_id = g.tenant_id AND EXISTS (
            SELECT 1 FROM public.duplicate_members dm JOIN public.images di ON di.id = dm.image_id
            WHERE dm.group_id = g.id AND dm.tenant_id = g.tenant_id
              AND di.sha256 IN (d.image_a_sha256, d.image_b_sha256))) AS decisions"""


def _groups_view(create: str, member_decision: str = "", decisions_column: str = "") -> str:
    """``catalog.duplicate_groups``: 0002's definition, or this revision's with the decisions
    appended (a ``decision`` per member, a ``decisions`` column after the old ones)."""
    return f"""
{create} VIEW catalog.duplicate_groups WITH (security_invoker = true) AS
SELECT g.tenant_id, g.id AS group_id, g.representative_image_id, ri.sha256 AS representative_sha256,
       count(m.image_id) AS member_count,
       coalesce(jsonb_agg(jsonb_build_object(
           'image_id', m.image_id, 'sha256', mi.sha256, 'method', m.method,
           'hamming_distance', m.hamming_distance, 'inliers', m.inliers,
           'products', {_PRODUCTS_OF.format(image="m.image_id", tenant="g.tenant_id")}{member_decision})
           ORDER BY m.image_id) FILTER (WHERE m.image_id IS NOT NULL), '[]'::jsonb) AS members,
       g.created_at{decisions_column}
FROM public.duplicate_groups g
JOIN public.images ri ON ri.id = g.representative_image_id
LEFT JOIN public.duplicate_members m ON m.group_id = g.id AND m.tenant_id = g.tenant_id
LEFT JOIN public.images mi ON mi.id = m.image_id
GROUP BY g.tenant_id, g.id, g.representative_image_id, ri.sha256, g.created_at"""


# 0002's definition, restored by the downgrade (CREATE OR REPLACE cannot drop a column).
_GROUPS_0002 = _groups_view("CREATE")
_GROUPS_0009 = _groups_view("CREATE OR REPLACE", _MEMBER_DECISION, _DECISIONS_COLUMN)

_GROUPS_COMMENT_0002 = (
    "COMMENT ON VIEW catalog.duplicate_groups IS "
    "'Exact/near duplicate image groups with their members and the products that use each image.'")

_GROUPS_COMMENT_0009 = (
    "COMMENT ON VIEW catalog.duplicate_groups IS 'Exact/near/confirmed duplicate image groups with their "
    "members, the products that use each image, and the merchant decisions that involve a member.'")

_DECISIONS_VIEW = f"""
CREATE VIEW catalog.duplicate_decisions WITH (security_invoker = true) AS
SELECT d.tenant_id, d.image_a_sha256, d.image_b_sha256, d.decision, d.occurred_at, d.merchant_id,
       d.reviewer, d.reason, d.event_id, ia.id AS image_a_id, ib.id AS image_b_id,
       CASE WHEN ia.id IS NULL THEN '[]'::jsonb
            ELSE {_PRODUCTS_OF.format(image="ia.id", tenant="d.tenant_id")} END AS image_a_products,
       CASE WHEN ib.id IS NULL THEN '[]'::jsonb
            ELSE {_PRODUCTS_OF.format(image="ib.id", tenant="d.tenant_id")} END AS image_b_products,
       coalesce(ma.group_id = mb.group_id, false) AS same_group,
       d.created_at, d.updated_at
FROM public.duplicate_decisions d
LEFT JOIN public.images ia ON ia.tenant_id = d.tenant_id AND ia.sha256 = d.image_a_sha256
LEFT JOIN public.images ib ON ib.tenant_id = d.tenant_id AND ib.sha256 = d.image_b_sha256
LEFT JOIN public.duplicate_members ma ON ma.image_id = ia.id AND ma.tenant_id = d.tenant_id
LEFT JOIN public.duplicate_members mb ON mb.image_id = ib.id AND mb.tenant_id = d.tenant_id;
COMMENT ON VIEW catalog.duplicate_decisions IS
    'Merchant decisions on image pairs (duplicate.reviewed): the latest by event time per pair, the images '
    'and products on each side, and whether the pair shares a duplicate group now.';"""


def _create_table() -> None:
    op.create_table(
        TABLE,
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("image_a_sha256", sa.String(64), nullable=False),
        sa.Column("image_b_sha256", sa.String(64), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("event_id", UUID(as_uuid=True), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("merchant_id", sa.String(128), nullable=False),
        sa.Column("reviewer", sa.String(256), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint('image_a_sha256 COLLATE "C" < image_b_sha256 COLLATE "C"',
                           name=op.f("ck_duplicate_decisions_pair_ordered")),
        sa.CheckConstraint("decision IN ('not_duplicate', 'confirmed')",
                           name=op.f("ck_duplicate_decisions_decision")),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"],
                                name=op.f("fk_duplicate_decisions_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_duplicate_decisions")),
        sa.UniqueConstraint("tenant_id", "image_a_sha256", "image_b_sha256",
                            name=op.f("uq_duplicate_decisions_tenant_id_image_a_sha256_image_b_sha256")),
    )
    op.create_index("ix_duplicate_decisions_tenant_id_image_b_sha256", TABLE, ["tenant_id", "image_b_sha256"])


def _secure_table() -> None:
    op.execute(f"ALTER TABLE public.{TABLE} ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE public.{TABLE} FORCE ROW LEVEL SECURITY")
    op.execute(f"CREATE POLICY tenant_isolation ON public.{TABLE} "
               f"USING ({TENANT_PREDICATE}) WITH CHECK ({TENANT_PREDICATE})")
    op.execute(f"CREATE POLICY system_scope ON public.{TABLE} TO {WORKER} "
               f"USING ({SYSTEM_PREDICATE}) WITH CHECK ({SYSTEM_PREDICATE})")
    op.execute(f"CREATE POLICY admin_system_scope ON public.{TABLE} TO {ADMIN} "
               f"USING ({SYSTEM_PREDICATE}) WITH CHECK ({SYSTEM_PREDICATE})")
    # Explicit, not only through 0005/0007's default privileges: those cover tables created by the
    # role that ran them, and another migrating login may run this one.
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON public.{TABLE} TO {WORKER}, {ADMIN}")
    op.execute(f"GRANT USAGE, SELECT, UPDATE ON SEQUENCE public.{TABLE}_id_seq TO {WORKER}, {ADMIN}")
    op.execute(f"GRANT SELECT ON public.{TABLE} TO {READER}")


def _method_check(values: str) -> None:
    op.execute("ALTER TABLE duplicate_members DROP CONSTRAINT ck_duplicate_members_method")
    op.execute("ALTER TABLE duplicate_members ADD CONSTRAINT ck_duplicate_members_method"
               f" CHECK (method IN ({values}))")


def upgrade() -> None:
    _create_table()
    _secure_table()
    _method_check("'exact', 'near', 'confirmed'")
    for column in HASH_COLUMNS_ADDED:
        op.add_column("images", sa.Column(column, BIT(64), nullable=True))
        op.execute(f"CREATE INDEX ix_images_{column}_hnsw ON images USING hnsw ({column} bit_hamming_ops)")
    op.execute(_GROUPS_0009)
    op.execute(_GROUPS_COMMENT_0009)
    op.execute(_DECISIONS_VIEW)
    op.execute(f"GRANT SELECT ON catalog.duplicate_decisions TO {WORKER}, {READER}, {ADMIN}")


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS catalog.duplicate_decisions")
    op.execute("DROP VIEW IF EXISTS catalog.duplicate_groups")
    op.execute(_GROUPS_0002)
    op.execute(_GROUPS_COMMENT_0002)
    op.execute(f"GRANT SELECT ON catalog.duplicate_groups TO {WORKER}, {READER}, {ADMIN}")
    for column in reversed(HASH_COLUMNS_ADDED):
        op.execute(f"DROP INDEX IF EXISTS ix_images_{column}_hnsw")
        op.drop_column("images", column)
    # A merchant-confirmed member stays in its group as the nearest earlier kind of evidence. RLS is
    # forced, so the owner sees no member rows: lifted for this one statement, then forced again.
    op.execute("ALTER TABLE public.duplicate_members NO FORCE ROW LEVEL SECURITY")
    op.execute("UPDATE duplicate_members SET method = 'near' WHERE method = 'confirmed'")
    op.execute("ALTER TABLE public.duplicate_members FORCE ROW LEVEL SECURITY")
    _method_check("'exact', 'near'")
    for policy in ("admin_system_scope", "system_scope", "tenant_isolation"):
        op.execute(f"DROP POLICY IF EXISTS {policy} ON public.{TABLE}")
    op.drop_table(TABLE)
