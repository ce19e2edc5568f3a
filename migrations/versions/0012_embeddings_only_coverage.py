"""embeddings-only products count as covered (issue 16, enrichment policy)

A product whose enrichment policy generates no listing (``tasks.pipeline.policy``: dedup and
embeddings, optionally grounding) gets a record in ``listings`` keyed by its clip version, with
``model_versions ->> 'policy'`` naming the policy, instead of a listing of the active vlm. Without
this change ``catalog.enrichment_status`` would call every such product ``missing_listing`` and the
reconciler would run it again on every pass. ``has_listing`` is now also true for a policy record
of the active clip version; nothing else in the view changes (same columns, grants kept).

Revision ID: 0012
Revises: 0011
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_VIEW = """
CREATE OR REPLACE VIEW catalog.enrichment_status WITH (security_invoker = true) AS
WITH active AS (
    SELECT (SELECT id FROM public.model_versions WHERE kind = 'vlm' AND status = 'active') AS vlm_id,
           (SELECT id FROM public.model_versions WHERE kind = 'clip' AND status = 'active') AS clip_id
), per_product AS (
    SELECT p.tenant_id, p.id AS product_id, p.external_id, p.version AS product_version, p.category,
           p.updated_at, j.id AS job_id, j.status AS job_status, j.stage AS job_stage, j.error_code,
           j.retryable, j.updated_at AS job_updated_at,
           CASE WHEN a.vlm_id IS NULL THEN NULL ELSE EXISTS (
               SELECT 1 FROM public.listings l
               WHERE l.tenant_id = p.tenant_id AND l.product_id = p.id
                 AND l.product_version = p.version
                 AND (l.model_version_id = a.vlm_id
                      {policy})) END AS has_listing,
           CASE WHEN a.clip_id IS NULL THEN NULL ELSE EXISTS (
               SELECT 1 FROM public.listings l
               JOIN public.embeddings e ON e.listing_id = l.id AND e.model_version_id = a.clip_id
               WHERE l.tenant_id = p.tenant_id AND l.product_id = p.id
                 AND l.product_version = p.version) END AS has_embedding
    FROM public.products p
    CROSS JOIN active a
    LEFT JOIN LATERAL (
        SELECT jj.* FROM public.enrichment_jobs jj
        WHERE jj.product_id = p.id AND jj.product_version = p.version AND jj.tenant_id = p.tenant_id
        ORDER BY jj.id DESC LIMIT 1) j ON true
)
SELECT pp.*,
       CASE WHEN pp.has_listing AND pp.has_embedding THEN 'complete'
            WHEN pp.job_status IN ('pending', 'running') THEN 'in_progress'
            WHEN pp.job_status = 'failed' THEN 'failed'
            ELSE 'incomplete' END AS state
FROM per_product pp;
"""
_POLICY = "OR (l.model_version_id = a.clip_id AND l.model_versions ? 'policy')"


def upgrade() -> None:
    op.execute(_VIEW.format(policy=_POLICY))


def downgrade() -> None:
    op.execute(_VIEW.format(policy=""))
