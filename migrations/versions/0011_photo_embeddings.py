"""every photo of a product (issue 13): one embedding per photo, and which photos show the product

A product arrives with several photos (front, back, detail, label, size chart). The GPU stage now
grounds and embeds each of them (up to ``ENRICH_MODELS__MAX_IMAGES``); the product vector in
``embeddings`` (what ``similar_products`` uses) is the mean of the photos that show the product,
and each photo's own vector lands here, for image-level search:

* ``photo_embeddings``: tenant-scoped (RLS forced, the 0005/0007 policies and grants), one row per
  (listing, image, clip version): the photo's ``position`` among the product's photos (0 = the
  primary), ``on_product`` (false: CLIP zero-shot took it for a size chart, a care label, printed
  text or a barcode, so it neither voted on attributes nor entered the product vector),
  ``product_probability``, its grounding (``groundings``, like the primary's) and the vector.
* ``catalog.product_photos`` (security invoker: the caller's tenant policies apply): each photo
  with the product's external id, the stored image's URI and the vector, for ``ORDER BY embedding <=> …``
  within a tenant. Not HNSW-indexed: vectors of several clip versions (and widths) share the table;
  a tenant's photos are scanned exactly, which the product-level index does not need to be.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import VECTOR

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

TABLE = "photo_embeddings"
TENANT_SCOPED_ADDED = (TABLE,)  # secured here, after 0005/0007 froze their lists
WORKER, READER, ADMIN = "enrich_worker", "enrich_reader", "enrich_admin"
TENANT_PREDICATE = "tenant_id = current_setting('enrich.tenant_id', true)"
SYSTEM_PREDICATE = "current_setting('enrich.scope', true) = 'system'"

_VIEW = """
CREATE VIEW catalog.product_photos WITH (security_invoker = true) AS
SELECT e.tenant_id, p.external_id, e.listing_id, e.image_id, i.storage_uri AS image_uri, e.position,
       e.on_product, e.product_probability, g.box, e.model_version_id, e.dims, e.embedding
FROM public.photo_embeddings e
JOIN public.products p ON p.id = e.product_id AND p.tenant_id = e.tenant_id
JOIN public.images i ON i.id = e.image_id AND i.tenant_id = e.tenant_id
LEFT JOIN public.groundings g ON g.id = e.grounding_id AND g.tenant_id = e.tenant_id;
COMMENT ON VIEW catalog.product_photos IS
    'Every photo of every enriched product with its own CLIP vector (position 0 = primary); on_product false: '
    'a size chart, label or text, left out of the product vector.';"""


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("tenant_id", sa.String(128), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("product_id", sa.BigInteger, sa.ForeignKey("products.id", ondelete="CASCADE"), nullable=False),
        sa.Column("listing_id", sa.BigInteger, sa.ForeignKey("listings.id", ondelete="CASCADE"), nullable=False),
        sa.Column("image_id", sa.BigInteger, sa.ForeignKey("images.id"), nullable=False),
        sa.Column("model_version_id", sa.BigInteger, sa.ForeignKey("model_versions.id"), nullable=False),
        sa.Column("position", sa.SmallInteger, nullable=False),
        sa.Column("on_product", sa.Boolean, nullable=False),
        sa.Column("product_probability", sa.Float, nullable=True),
        sa.Column("grounding_id", sa.BigInteger, sa.ForeignKey("groundings.id"), nullable=True),
        sa.Column("dims", sa.SmallInteger, nullable=False),
        sa.Column("embedding", VECTOR(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.UniqueConstraint("listing_id", "image_id", "model_version_id",
                            name="uq_photo_embeddings_listing_id_image_id_model_version_id"),
    )
    op.create_index("ix_photo_embeddings_tenant_id_image_id", TABLE, ["tenant_id", "image_id"])
    op.execute(f"ALTER TABLE public.{TABLE} ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE public.{TABLE} FORCE ROW LEVEL SECURITY")
    op.execute(f"CREATE POLICY tenant_isolation ON public.{TABLE} "
               f"USING ({TENANT_PREDICATE}) WITH CHECK ({TENANT_PREDICATE})")
    op.execute(f"CREATE POLICY system_scope ON public.{TABLE} TO {WORKER} "
               f"USING ({SYSTEM_PREDICATE}) WITH CHECK ({SYSTEM_PREDICATE})")
    op.execute(f"CREATE POLICY admin_system_scope ON public.{TABLE} TO {ADMIN} "
               f"USING ({SYSTEM_PREDICATE}) WITH CHECK ({SYSTEM_PREDICATE})")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON public.{TABLE} TO {WORKER}, {ADMIN}")
    op.execute(f"GRANT USAGE, SELECT, UPDATE ON SEQUENCE public.{TABLE}_id_seq TO {WORKER}, {ADMIN}")
    op.execute(f"GRANT SELECT ON public.{TABLE} TO {READER}")
    op.execute(_VIEW)
    op.execute(f"GRANT SELECT ON catalog.product_photos TO {WORKER}, {READER}, {ADMIN}")


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS catalog.product_photos")
    for policy in ("admin_system_scope", "system_scope", "tenant_isolation"):
        op.execute(f"DROP POLICY IF EXISTS {policy} ON public.{TABLE}")
    op.drop_table(TABLE)
