"""SQL interface: schema ``catalog`` with similarity functions and views for SQL users

Everything an analyst or a non-Python service needs lives in the ``catalog`` schema and is
stable across releases (new columns may be appended; nothing is renamed or removed without a
new major version):

* ``catalog.similar_products(tenant, product_external_id, k, same_category)``
* ``catalog.search_by_embedding(tenant, query, k, category, target)``
* ``catalog.explain_search_by_embedding(...)``: the plan of exactly what the search runs
* ``catalog.active_embedding_model()``: which model/dimension a query vector must come from
* views ``catalog.current_listings``, ``catalog.duplicate_groups``, ``catalog.enrichment_status``

Functions read the active clip model version only and build their statement from the integer
dimension stored in ``model_versions`` (so the partial per-dimension HNSW index matches);
every caller-supplied value is bound with ``USING``.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Iterative HNSW scans keep walking the graph until the filters (tenant, category, model
# version) leave enough rows; the tuple cap bounds the worst case for a category that is tiny.
MAX_SCAN_TUPLES = 100_000

_HELPERS = r"""
CREATE SCHEMA IF NOT EXISTS catalog;
COMMENT ON SCHEMA catalog IS 'Stable SQL interface of catalog-enrich (functions and views for SQL users).';

CREATE TYPE catalog.neighbour AS (product_id bigint, distance double precision);

CREATE FUNCTION catalog.active_embedding_model()
RETURNS TABLE (model_version_id integer, name text, revision text, dims integer, random_weights boolean)
LANGUAGE sql STABLE
SET search_path = pg_catalog, public
AS $fn$
    SELECT mv.id, mv.name::text, mv.revision::text, mv.dims::integer, mv.random_weights
    FROM public.model_versions mv
    WHERE mv.kind = 'clip' AND mv.status = 'active'
$fn$;
COMMENT ON FUNCTION catalog.active_embedding_model() IS
    'The clip model version every search reads; query vectors must have its dims.';

-- Statement text of one nearest-neighbour scan. Only the integer dimension and fixed fragments
-- chosen by booleans/whitelisted names are formatted in; all values are $n parameters:
-- $1 query, $2 model_version_id, $3 tenant, $4 category, $5 excluded product id, $6 limit.
CREATE FUNCTION catalog._nearest_sql(p_dims integer, p_target text, p_by_category boolean,
                                     p_exclude_product boolean)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog
AS $fn$
DECLARE
    v_column text;
BEGIN
    IF p_dims IS NULL OR p_dims < 1 OR p_dims > 16000 THEN
        RAISE EXCEPTION 'invalid embedding dimension %', p_dims USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_column := CASE p_target WHEN 'image' THEN 'image_embedding' WHEN 'text' THEN 'text_embedding' END;
    IF v_column IS NULL THEN
        RAISE EXCEPTION 'target must be ''image'' or ''text'', got %', quote_nullable(p_target)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN format(
        'WITH candidates AS MATERIALIZED ('
        ' SELECT e.product_id, e.listing_id,'
        '        (e.%1$I::vector(%2$s) <=> $1::vector(%2$s))::double precision AS distance'
        ' FROM public.embeddings e'
        ' WHERE e.dims = %2$s AND e.model_version_id = $2 AND e.tenant_id = $3%3$s%4$s'
        ' ORDER BY e.%1$I::vector(%2$s) <=> $1::vector(%2$s)'
        ' LIMIT $6)'
        ' SELECT c.product_id, c.listing_id, c.distance FROM candidates c ORDER BY c.distance',
        v_column,
        p_dims,
        CASE WHEN p_by_category THEN ' AND e.category = $4' ELSE '' END,
        CASE WHEN p_exclude_product THEN ' AND e.product_id <> $5' ELSE '' END);
END
$fn$;

CREATE FUNCTION catalog._require_active_clip(OUT model_version_id integer, OUT dims integer)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, public
AS $fn$
BEGIN
    SELECT mv.id, mv.dims INTO model_version_id, dims
    FROM public.model_versions mv WHERE mv.kind = 'clip' AND mv.status = 'active';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no active clip model version'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'backfill one and run: enrich embeddings activate <id>';
    END IF;
    IF dims IS NULL THEN
        RAISE EXCEPTION 'active clip model version % has no dims recorded', model_version_id
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
END
$fn$;

CREATE FUNCTION catalog._check_search_args(p_query vector, p_k integer, p_dims integer,
                                           p_model_version_id integer)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, public
AS $fn$
BEGIN
    IF p_k IS NULL OR p_k < 1 OR p_k > 1000 THEN
        RAISE EXCEPTION 'k must be between 1 and 1000, got %', coalesce(p_k::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_query IS NULL THEN
        RAISE EXCEPTION 'query vector is NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF vector_dims(p_query) <> p_dims THEN
        RAISE EXCEPTION 'query vector has % dimensions; the active clip model version % has %',
            vector_dims(p_query), p_model_version_id, p_dims
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'embed the query with the model named by catalog.active_embedding_model()';
    END IF;
END
$fn$;
"""

_SEARCH = rf"""
-- One index scan under the active version, iterative so that filters still leave p_limit rows.
CREATE FUNCTION catalog._nearest_rows(p_tenant text, p_query vector, p_limit integer, p_category text,
                                      p_target text, p_model_version_id integer, p_dims integer,
                                      p_exclude_product bigint)
RETURNS TABLE (product_id bigint, listing_id bigint, distance double precision)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, public
SET hnsw.iterative_scan = 'relaxed_order'
SET hnsw.max_scan_tuples = {MAX_SCAN_TUPLES}
AS $fn$
BEGIN
    RETURN QUERY EXECUTE
        catalog._nearest_sql(p_dims, p_target, p_category IS NOT NULL, p_exclude_product IS NOT NULL)
        USING p_query, p_model_version_id, p_tenant, p_category, p_exclude_product, p_limit;
END
$fn$;

-- Nearest products (not listings): one row per product, from the embedding of its newest
-- embedded version. Fetches more candidates while duplicates/stale rows leave fewer than k.
CREATE FUNCTION catalog._nearest_products(p_tenant text, p_query vector, p_k integer, p_category text,
                                          p_target text, p_exclude_product bigint)
RETURNS SETOF catalog.neighbour
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, public
AS $fn$
DECLARE
    v_active record;
    v_fetch integer;
    v_raw integer;
    v_hits catalog.neighbour[];
BEGIN
    SELECT * INTO v_active FROM catalog._require_active_clip();
    PERFORM catalog._check_search_args(p_query, p_k, v_active.dims, v_active.model_version_id);
    IF p_tenant IS NULL THEN
        RAISE EXCEPTION 'tenant is NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    v_fetch := greatest(2 * p_k, 20);
    LOOP
        WITH raw AS MATERIALIZED (
            SELECT r.product_id, r.listing_id, r.distance
            FROM catalog._nearest_rows(p_tenant, p_query, v_fetch, p_category, p_target,
                                       v_active.model_version_id, v_active.dims, p_exclude_product) r
        ), fresh AS (
            SELECT r.product_id, r.distance
            FROM raw r
            JOIN public.listings l ON l.id = r.listing_id
            WHERE NOT EXISTS (
                SELECT 1 FROM public.listings newer
                JOIN public.embeddings ne ON ne.listing_id = newer.id
                                         AND ne.model_version_id = v_active.model_version_id
                WHERE newer.tenant_id = p_tenant AND newer.product_id = r.product_id
                  AND newer.product_version > l.product_version)
        ), best AS (
            SELECT DISTINCT ON (f.product_id) f.product_id, f.distance
            FROM fresh f ORDER BY f.product_id, f.distance
        )
        SELECT (SELECT count(*) FROM raw),
               (SELECT array_agg(ROW(b.product_id, b.distance)::catalog.neighbour ORDER BY b.distance)
                FROM best b)
        INTO v_raw, v_hits;
        EXIT WHEN coalesce(cardinality(v_hits), 0) >= p_k OR v_raw < v_fetch OR v_fetch >= 64 * p_k;
        v_fetch := v_fetch * 4;
    END LOOP;
    RETURN QUERY SELECT h.product_id, h.distance FROM unnest(v_hits) h ORDER BY h.distance LIMIT p_k;
END
$fn$;

CREATE FUNCTION catalog.search_by_embedding(tenant text, query vector, k integer DEFAULT 10,
                                            category_filter text DEFAULT NULL, target text DEFAULT 'image')
RETURNS TABLE (external_id text, distance double precision, category text, title text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, public
AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT p.external_id::text, n.distance, p.category::text, p.title
    FROM catalog._nearest_products(search_by_embedding.tenant, search_by_embedding.query,
                                   search_by_embedding.k, search_by_embedding.category_filter,
                                   search_by_embedding.target, NULL) n
    JOIN public.products p ON p.id = n.product_id AND p.tenant_id = search_by_embedding.tenant
    ORDER BY n.distance, p.external_id;
END
$fn$;
COMMENT ON FUNCTION catalog.search_by_embedding(text, vector, integer, text, text) IS
    'k nearest products of one tenant to a query vector of the active clip model (cosine distance). '
    'target = image (default) or text selects which stored embedding is compared. '
    'Wrong dimension: SQLSTATE 22023. No active model: 55000.';

CREATE FUNCTION catalog.similar_products(tenant text, product_external_id text, k integer DEFAULT 10,
                                         same_category boolean DEFAULT false)
RETURNS TABLE (external_id text, distance double precision, category text, title text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, public
AS $fn$
#variable_conflict use_column
DECLARE
    v_active record;
    v_product record;
    v_query vector;
BEGIN
    SELECT * INTO v_active FROM catalog._require_active_clip();
    SELECT p.id, p.category INTO v_product
    FROM public.products p
    WHERE p.tenant_id = similar_products.tenant AND p.external_id = similar_products.product_external_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'product % not found for tenant %',
            quote_nullable(similar_products.product_external_id), quote_nullable(similar_products.tenant)
            USING ERRCODE = 'no_data_found';
    END IF;
    SELECT e.image_embedding INTO v_query
    FROM public.embeddings e JOIN public.listings l ON l.id = e.listing_id
    WHERE e.tenant_id = similar_products.tenant AND e.product_id = v_product.id
      AND e.model_version_id = v_active.model_version_id
    ORDER BY l.product_version DESC, e.id DESC
    LIMIT 1;
    IF v_query IS NULL THEN
        RAISE NOTICE 'product % has no embedding under the active clip model version % yet',
            similar_products.product_external_id, v_active.model_version_id;
        RETURN;
    END IF;
    RETURN QUERY
    SELECT p.external_id::text, n.distance, p.category::text, p.title
    FROM catalog._nearest_products(similar_products.tenant, v_query, similar_products.k,
                                   CASE WHEN similar_products.same_category THEN v_product.category END,
                                   'image', v_product.id) n
    JOIN public.products p ON p.id = n.product_id AND p.tenant_id = similar_products.tenant
    ORDER BY n.distance, p.external_id;
END
$fn$;
COMMENT ON FUNCTION catalog.similar_products(text, text, integer, boolean) IS
    'k products of the same tenant that look most like the given one (image embedding, active clip model). '
    'Unknown product: SQLSTATE P0002. Product not embedded yet: no rows and a NOTICE.';

CREATE FUNCTION catalog.explain_search_by_embedding(tenant text, query vector, k integer DEFAULT 10,
                                                    category_filter text DEFAULT NULL,
                                                    target text DEFAULT 'image')
RETURNS SETOF text
LANGUAGE plpgsql
SET search_path = pg_catalog, public
SET hnsw.iterative_scan = 'relaxed_order'
SET hnsw.max_scan_tuples = {MAX_SCAN_TUPLES}
AS $fn$
DECLARE
    v_active record;
BEGIN
    SELECT * INTO v_active FROM catalog._require_active_clip();
    PERFORM catalog._check_search_args(query, k, v_active.dims, v_active.model_version_id);
    RETURN QUERY EXECUTE
        'EXPLAIN ' || catalog._nearest_sql(v_active.dims, target, category_filter IS NOT NULL, false)
        USING query, v_active.model_version_id, tenant, category_filter, NULL::bigint, greatest(2 * k, 20);
END
$fn$;
COMMENT ON FUNCTION catalog.explain_search_by_embedding(text, vector, integer, text, text) IS
    'EXPLAIN of the index scan search_by_embedding runs first (same statement, same settings).';
"""

_VIEWS = r"""
CREATE VIEW catalog.current_listings WITH (security_invoker = true) AS
SELECT DISTINCT ON (l.product_id)
    l.tenant_id, p.external_id, l.product_id, l.product_version, l.id AS listing_id, l.status,
    l.category, l.content ->> 'title' AS title, l.content ->> 'description' AS description,
    l.content -> 'attributes' AS attributes, l.content, l.model_version_id, l.random_weights,
    l.created_at, l.reviewed_at
FROM public.listings l
JOIN public.products p ON p.id = l.product_id AND p.tenant_id = l.tenant_id
WHERE l.status <> 'rejected'
ORDER BY l.product_id, (l.status IN ('accepted', 'edited')) DESC, l.product_version DESC,
         l.created_at DESC, l.id DESC;
COMMENT ON VIEW catalog.current_listings IS
    'Per product: the merchant-accepted (or edited) listing if any, else the latest proposal. '
    'Rejected listings never appear.';

CREATE VIEW catalog.duplicate_groups WITH (security_invoker = true) AS
SELECT g.tenant_id, g.id AS group_id, g.representative_image_id, ri.sha256 AS representative_sha256,
       count(m.image_id) AS member_count,
       coalesce(jsonb_agg(jsonb_build_object(
           'image_id', m.image_id, 'sha256', mi.sha256, 'method', m.method,
           'hamming_distance', m.hamming_distance, 'inliers', m.inliers,
           'products', (SELECT coalesce(jsonb_agg(DISTINCT p.external_id), '[]'::jsonb)
                        FROM public.product_images pi
                        JOIN public.products p ON p.id = pi.product_id AND p.tenant_id = pi.tenant_id
                        WHERE pi.image_id = m.image_id AND pi.tenant_id = g.tenant_id))
           ORDER BY m.image_id) FILTER (WHERE m.image_id IS NOT NULL), '[]'::jsonb) AS members,
       g.created_at
FROM public.duplicate_groups g
JOIN public.images ri ON ri.id = g.representative_image_id
LEFT JOIN public.duplicate_members m ON m.group_id = g.id AND m.tenant_id = g.tenant_id
LEFT JOIN public.images mi ON mi.id = m.image_id
GROUP BY g.tenant_id, g.id, g.representative_image_id, ri.sha256, g.created_at;
COMMENT ON VIEW catalog.duplicate_groups IS
    'Exact/near duplicate image groups with their members and the products that use each image.';

CREATE VIEW catalog.enrichment_status WITH (security_invoker = true) AS
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
                 AND l.product_version = p.version AND l.model_version_id = a.vlm_id) END AS has_listing,
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
COMMENT ON VIEW catalog.enrichment_status IS
    'Per product (latest version): latest job and whether the active vlm/clip versions produced output. '
    'has_listing/has_embedding are NULL when no model of that kind is active.';
"""


def upgrade() -> None:
    # Loads pgvector's library in this session so its hnsw.* settings are known, not placeholders.
    op.execute("SELECT '[1]'::vector")
    op.create_index("ix_embeddings_model_version_id_listing_id", "embeddings",
                    ["model_version_id", "listing_id"])
    op.create_index("ix_enrichment_jobs_product_id_product_version", "enrichment_jobs",
                    ["product_id", "product_version"])
    op.create_check_constraint(
        "dims_match", "embeddings",
        "vector_dims(image_embedding) = dims AND vector_dims(text_embedding) = dims",
    )
    for block in (_HELPERS, _SEARCH, _VIEWS):
        op.execute(block)


def downgrade() -> None:
    op.execute("DROP SCHEMA IF EXISTS catalog CASCADE")
    op.drop_constraint(op.f("ck_embeddings_dims_match"), "embeddings", type_="check")
    op.drop_index("ix_enrichment_jobs_product_id_product_version", table_name="enrichment_jobs")
    op.drop_index("ix_embeddings_model_version_id_listing_id", table_name="embeddings")
