"""similarity at a million rows (issue 16): one streaming statement per search, planned once

Where 0002/0005's ``similar_products`` spent its time (100k rows, one client, as ``enrich_reader``):

* the query vector of ``similar_products`` was looked up by ``embeddings.product_id``, which has no
  index: a scan of every embedding of the version per call (O(N), most of the latency);
* the plpgsql result of ``_nearest_products`` was joined to ``products`` with an estimate of 1000
  rows, so the planner could hash-join a scan of every product (O(N) again);
* each call planned the nearest-neighbour statement afresh (``EXECUTE``), and the freshness check
  and ``DISTINCT ON`` ran after the ``LIMIT``, inside a loop that re-ran the scan with 4x the fetch
  whenever stale rows or duplicates left fewer than k.

Now one statement streams the HNSW scan (iterative, so filters never starve it) through the
freshness anti-join and stops at k: a product's *current* embedding is the one of its newest
embedded ``(product_version, listing id)`` under the active clip version, exactly one per product,
so no ``DISTINCT`` and no loop are needed. For each embedding size a function
``catalog_impl.nearest_<dims>`` holds that statement as static SQL for the unfiltered searches
(one generic plan per session, no planning per call); category-filtered searches plan per call
(``EXECUTE``) so the planner sees the category and picks an exact scan for a rare one; any search
that still comes back short of k (a category or tenant the graph walk could not fill within
``hnsw.max_scan_tuples``) is re-run exactly, so filtered results stay k-complete. The size's
function is installed with its HNSW indexes (``catalog_impl._install_nearest(dims)``, called here
for every size in ``model_versions`` and by ``db.vector_indexes.ensure_dimension_index``); a size
without one falls back to ``catalog_impl._nearest_dynamic`` (same statements, planned per call).

The static statement ends in ``LIMIT 10`` (a constant, then trimmed to k): a generic plan of
``LIMIT $n`` assumes a tenth of the table and sorts it instead of walking the index; k above 10 is
planned per call. The search functions run with ``jit = off`` (compiling a plan costs more than a
search). A size's indexes may be built on ``halfvec`` (``db.vector_indexes.ensure_dimension_index
(..., precision="halfvec")``, setting ``ENRICH_DB__VECTOR_INDEX_PRECISION``): the size's function
then walks the half-precision graph and still returns single-precision distances.

``ix_embeddings_tenant_id_category_model_version_id`` serves the exact scans of a rare category or
a small tenant and the planner's row estimates for them. A product's one current embedding is the
newest ``(product_version, listing id)`` embedded under the active version (0002 took, among the
newest version's listings, the one nearest the query; the two differ only when two listing-model
versions listed the same product version).

Signatures, SQLSTATEs and documented behaviour of the ``catalog`` functions are unchanged; the
0005 wrappers still scope each call to the tenant it names. The previous bodies are kept, renamed
``*_0002``, and restored by the downgrade.

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

IMPL = "catalog_impl"
ROLES = "enrich_worker, enrich_reader, enrich_admin"
MAX_SCAN_TUPLES = 100_000  # as in 0002: bounds the graph walk of a filter that matches little
STATIC_K = 10  # unfiltered searches up to this k run the statement planned once (LIMIT 10, then trimmed)
CATEGORY_INDEX = "ix_embeddings_tenant_id_category_model_version_id"
_REPLACED = (
    ("similar_products", "text, text, integer, boolean"),
    ("search_by_embedding", "text, vector, integer, text, text"),
    ("explain_search_by_embedding", "text, vector, integer, text, text"),
)
_NEAREST_ARGS = "text, vector, integer, text, bigint, integer, text"

_SQL = rf"""
CREATE TYPE {IMPL}.hit AS (external_id text, distance double precision, category text, title text);

-- The one search statement, for one size and target. Parameters: $1 tenant, $2 query, $3 k,
-- $4 category (used when p_by_category), $5 excluded product id (NULL: none), $6 clip version.
-- p_exact: order by the bare column, which no index matches (an exact scan). p_limit: '$3', or a
-- constant for a statement planned once (a generic plan of LIMIT $n assumes 10 % of the rows and
-- sorts the table instead of walking the index).
-- p_precision: the type the size's HNSW indexes are built on ('vector', or 'halfvec': half the
-- index size; the distances returned are still computed on the stored single-precision vectors).
CREATE FUNCTION {IMPL}._nearest_query(p_dims integer, p_target text, p_by_category boolean, p_exact boolean,
                                      p_limit text DEFAULT '$3', p_precision text DEFAULT 'vector')
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog
AS $fn$
DECLARE
    v_column text;
    v_order text;
    v_distance text;
BEGIN
    IF p_dims IS NULL OR p_dims < 1 OR p_dims > 16000 THEN
        RAISE EXCEPTION 'invalid embedding dimension %', p_dims USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_column := CASE p_target WHEN 'image' THEN 'image_embedding' WHEN 'text' THEN 'text_embedding' END;
    IF v_column IS NULL THEN
        RAISE EXCEPTION 'target must be ''image'' or ''text'', got %', quote_nullable(p_target)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_precision IS NULL OR p_precision NOT IN ('vector', 'halfvec') THEN
        RAISE EXCEPTION 'precision must be vector or halfvec, got %', quote_nullable(p_precision)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_order := CASE WHEN p_exact THEN format('e.%I <=> $2', v_column)
                    ELSE format('e.%1$I::%3$s(%2$s) <=> $2::%3$s(%2$s)', v_column, p_dims, p_precision) END;
    v_distance := CASE WHEN p_precision = 'vector' THEN v_order ELSE format('e.%I <=> $2', v_column) END;
    RETURN format(
        'SELECT p.external_id::text, h.distance, p.category::text, p.title'
        ' FROM (SELECT e.product_id, (%1$s)::double precision AS distance'
        '       FROM public.embeddings e JOIN public.listings l ON l.id = e.listing_id'
        '       WHERE e.dims = %2$s AND e.model_version_id = $6 AND e.tenant_id = $1%3$s'
        '         AND e.product_id IS DISTINCT FROM $5'
        '         AND NOT EXISTS (SELECT 1 FROM public.listings newer'
        '                         JOIN public.embeddings ne ON ne.listing_id = newer.id AND ne.model_version_id = $6'
        '                         WHERE newer.tenant_id = $1 AND newer.product_id = e.product_id'
        '                           AND (newer.product_version, newer.id) > (l.product_version, l.id))'
        '       ORDER BY %5$s LIMIT %4$s) h'
        ' JOIN public.products p ON p.id = h.product_id AND p.tenant_id = $1'
        ' ORDER BY h.distance, p.external_id',
        v_distance, p_dims, CASE WHEN p_by_category THEN ' AND e.category = $4' ELSE '' END,
        CASE WHEN p_limit = '$3' THEN p_limit ELSE p_limit::integer::text END, v_order);
END
$fn$;

-- Body shared by nearest_<dims> and _nearest_dynamic; %1$s / %2$s: the unfiltered image / text
-- statements (static SQL in nearest_<dims>, EXECUTE in the fallback); %3$s / %4$s: expressions of
-- the size and the index precision.
CREATE FUNCTION {IMPL}._nearest_body(p_image text, p_text text, p_dims text, p_precision text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog
AS $fn$
SELECT format($body$
DECLARE
    v_hits {IMPL}.hit[];
BEGIN
    IF p_category IS NULL AND p_k <= {STATIC_K} AND p_target = 'image' THEN
        %1$s
        v_hits := v_hits[1:p_k];
    ELSIF p_category IS NULL AND p_k <= {STATIC_K} THEN
        %2$s
        v_hits := v_hits[1:p_k];
    ELSE
        EXECUTE 'SELECT ARRAY(SELECT ROW(q.*)::{IMPL}.hit FROM ('
                || {IMPL}._nearest_query(%3$s, p_target, p_category IS NOT NULL, false, '$3', %4$s) || ') q)'
            INTO v_hits USING p_tenant, p_query, p_k, p_category, p_exclude, p_version;
    END IF;
    IF coalesce(cardinality(v_hits), 0) < p_k THEN
        -- The graph walk stopped short (rare category, small tenant): the exact answer instead.
        EXECUTE 'SELECT ARRAY(SELECT ROW(q.*)::{IMPL}.hit FROM ('
                || {IMPL}._nearest_query(%3$s, p_target, p_category IS NOT NULL, true, '$3', %4$s) || ') q)'
            INTO v_hits USING p_tenant, p_query, p_k, p_category, p_exclude, p_version;
    END IF;
    RETURN QUERY SELECT * FROM unnest(v_hits);
END
$body$, p_image, p_text, p_dims, p_precision)
$fn$;

-- What the size's image index is built on: 'halfvec' or 'vector' (also when there is none).
CREATE FUNCTION {IMPL}._index_precision(p_dims integer)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog
AS $fn$
    SELECT CASE WHEN pg_get_indexdef(c.oid) LIKE '%halfvec_cosine_ops%' THEN 'halfvec' ELSE 'vector' END
    FROM (SELECT NULL) one
    LEFT JOIN pg_class c ON c.relname = format('ix_embeddings_image_embedding_%s_hnsw', p_dims)
                        AND c.relnamespace = 'public'::regnamespace AND c.relkind = 'i'
$fn$;

CREATE FUNCTION {IMPL}._install_nearest(p_dims integer)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $fn$
DECLARE
    v_name text := 'nearest_' || p_dims;
    v_precision text := {IMPL}._index_precision(p_dims);
    v_static text := 'v_hits := ARRAY(SELECT ROW(q.*)::{IMPL}.hit FROM (%s) q);';
BEGIN
    EXECUTE format(
        'CREATE OR REPLACE FUNCTION {IMPL}.%I(p_tenant text, p_query vector, p_k integer, p_category text, '
        'p_exclude bigint, p_version integer, p_target text) '
        'RETURNS SETOF {IMPL}.hit LANGUAGE plpgsql STABLE '
        'SET search_path = pg_catalog, public '
        'SET hnsw.iterative_scan = ''relaxed_order'' SET hnsw.max_scan_tuples = {MAX_SCAN_TUPLES} '
        'SET plan_cache_mode = ''force_generic_plan'' SET jit = off AS %L',
        v_name,
        {IMPL}._nearest_body(
            format(v_static, {IMPL}._nearest_query(p_dims, 'image', false, false, '{STATIC_K}', v_precision)),
            format(v_static, {IMPL}._nearest_query(p_dims, 'text', false, false, '{STATIC_K}', v_precision)),
            p_dims::text, quote_literal(v_precision)));
    EXECUTE format('COMMENT ON FUNCTION {IMPL}.%I({_NEAREST_ARGS}) IS %L', v_name,
                   format('Nearest products among %s-dim embeddings (%s index; static plan for unfiltered '
                          'searches).', p_dims, v_precision));
    EXECUTE format('GRANT EXECUTE ON FUNCTION {IMPL}.%I({_NEAREST_ARGS}) TO {ROLES}', v_name);
    PERFORM {IMPL}._build_dispatch();
    RETURN v_name;
END
$fn$;

CREATE FUNCTION {IMPL}._drop_nearest(p_dims integer)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $fn$
BEGIN
    EXECUTE format('DROP FUNCTION IF EXISTS {IMPL}.%I({_NEAREST_ARGS})', 'nearest_' || p_dims);
    PERFORM {IMPL}._build_dispatch();
END
$fn$;
"""

_DYNAMIC = rf"""
CREATE FUNCTION {IMPL}._nearest_dynamic(p_dims integer, p_tenant text, p_query vector, p_k integer,
                                        p_category text, p_exclude bigint, p_version integer, p_target text)
RETURNS SETOF {IMPL}.hit
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, public
SET hnsw.iterative_scan = 'relaxed_order'
SET hnsw.max_scan_tuples = {MAX_SCAN_TUPLES}
SET jit = off
AS $dyn$%s$dyn$;
"""

_DYNAMIC_UNFILTERED = (
    f"EXECUTE 'SELECT ARRAY(SELECT ROW(q.*)::{IMPL}.hit FROM (' || {IMPL}._nearest_query(p_dims, %s, false, false, "
    f"'{STATIC_K}', {IMPL}._index_precision(p_dims)) "
    "|| ') q)' INTO v_hits USING p_tenant, p_query, p_k, p_category, p_exclude, p_version;"
)

_DISPATCH = rf"""
-- (Re)writes catalog_impl._nearest: the active version, the argument checks, then a static call of
-- the size's nearest_<dims> (one branch per installed size; others: the per-call fallback).
CREATE FUNCTION {IMPL}._build_dispatch()
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $fn$
DECLARE
    v_branches text := '';
    d integer;
BEGIN
    FOR d IN SELECT substring(p.proname FROM 9)::integer FROM pg_proc p
             WHERE p.pronamespace = '{IMPL}'::regnamespace AND p.proname ~ '^nearest_[0-9]+$' ORDER BY 1 LOOP
        v_branches := v_branches || format(
            ' ELSIF v_active.dims = %1$s THEN RETURN QUERY SELECT * FROM {IMPL}.nearest_%1$s(p_tenant, p_query,'
            ' p_k, p_category, p_exclude, v_active.model_version_id, p_target);', d);
    END LOOP;
    EXECUTE format($ddl$
CREATE OR REPLACE FUNCTION {IMPL}._nearest(p_tenant text, p_query vector, p_k integer, p_category text,
                                           p_target text, p_exclude bigint)
RETURNS SETOF {IMPL}.hit
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, public
AS %L$ddl$, format($body$
DECLARE
    v_active record;
BEGIN
    SELECT * INTO v_active FROM catalog._require_active_clip();
    PERFORM catalog._check_search_args(p_query, p_k, v_active.dims, v_active.model_version_id);
    IF p_tenant IS NULL THEN
        RAISE EXCEPTION 'tenant is NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF p_target IS NULL OR p_target NOT IN ('image', 'text') THEN
        RAISE EXCEPTION 'target must be ''image'' or ''text'', got %%', quote_nullable(p_target)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF false THEN NULL; %s
    ELSE
        RETURN QUERY SELECT * FROM {IMPL}._nearest_dynamic(v_active.dims, p_tenant, p_query, p_k, p_category,
                                                           p_exclude, v_active.model_version_id, p_target);
    END IF;
END
$body$, v_branches));
    EXECUTE 'GRANT EXECUTE ON FUNCTION {IMPL}._nearest(text, vector, integer, text, text, bigint) TO {ROLES}';
END
$fn$;
SELECT {IMPL}._build_dispatch();
"""

_SEARCH = rf"""
CREATE FUNCTION {IMPL}.search_by_embedding(tenant text, query vector, k integer DEFAULT 10,
                                           category_filter text DEFAULT NULL, target text DEFAULT 'image')
RETURNS TABLE (external_id text, distance double precision, category text, title text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, public
AS $fn$
    SELECT * FROM {IMPL}._nearest(tenant, query, k, category_filter, target, NULL)
$fn$;
COMMENT ON FUNCTION {IMPL}.search_by_embedding(text, vector, integer, text, text) IS
    'k nearest products of one tenant to a query vector of the active clip model (cosine distance). '
    'target = image (default) or text selects which stored embedding is compared. '
    'Wrong dimension: SQLSTATE 22023. No active model: 55000.';

CREATE FUNCTION {IMPL}.similar_products(tenant text, product_external_id text, k integer DEFAULT 10,
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
    -- Through listings (indexed by tenant and product): the product's current embedding.
    SELECT e.image_embedding INTO v_query
    FROM public.listings l
    JOIN public.embeddings e ON e.listing_id = l.id AND e.model_version_id = v_active.model_version_id
    WHERE l.tenant_id = similar_products.tenant AND l.product_id = v_product.id
    ORDER BY l.product_version DESC, l.id DESC
    LIMIT 1;
    IF v_query IS NULL THEN
        RAISE NOTICE 'product % has no embedding under the active clip model version % yet',
            similar_products.product_external_id, v_active.model_version_id;
        RETURN;
    END IF;
    RETURN QUERY
    SELECT * FROM {IMPL}._nearest(similar_products.tenant, v_query, similar_products.k,
                                  CASE WHEN similar_products.same_category THEN v_product.category END,
                                  'image', v_product.id);
END
$fn$;
COMMENT ON FUNCTION {IMPL}.similar_products(text, text, integer, boolean) IS
    'k products of the same tenant that look most like the given one (image embedding, active clip model). '
    'Unknown product: SQLSTATE P0002. Product not embedded yet: no rows and a NOTICE.';

CREATE FUNCTION {IMPL}.explain_search_by_embedding(tenant text, query vector, k integer DEFAULT 10,
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
    -- The plan for these values; unfiltered searches run the same statement with a cached plan.
    RETURN QUERY EXECUTE
        'EXPLAIN ' || {IMPL}._nearest_query(v_active.dims, target, category_filter IS NOT NULL, false, '$3',
                                            {IMPL}._index_precision(v_active.dims))
        USING tenant, query, k, category_filter, NULL::bigint, v_active.model_version_id;
END
$fn$;
COMMENT ON FUNCTION {IMPL}.explain_search_by_embedding(text, vector, integer, text, text) IS
    'EXPLAIN of the nearest-neighbour statement search_by_embedding runs (same statement, same settings).';
"""


def upgrade() -> None:
    op.execute("SELECT '[1]'::vector")  # loads pgvector, so hnsw.* in SET clauses are known settings
    op.create_index(CATEGORY_INDEX, "embeddings", ["tenant_id", "category", "model_version_id"])
    for name, identity in _REPLACED:
        op.execute(f"ALTER FUNCTION {IMPL}.{name}({identity}) RENAME TO {name}_0002")
    op.execute(_SQL)
    body = op.get_bind().execute(sa.text(
        f"SELECT {IMPL}._nearest_body(:image, :text, 'p_dims', '{IMPL}._index_precision(p_dims)')"), {
        "image": _DYNAMIC_UNFILTERED % "'image'", "text": _DYNAMIC_UNFILTERED % "'text'"}).scalar_one()
    op.execute(_DYNAMIC % body)
    op.execute(_DISPATCH)
    op.execute(_SEARCH)
    op.execute(f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {IMPL} TO {ROLES}")
    op.execute(f"""
DO $do$
DECLARE
    d integer;
BEGIN
    FOR d IN SELECT DISTINCT dims FROM public.model_versions WHERE kind = 'clip' AND dims IS NOT NULL
             UNION SELECT 512 LOOP
        PERFORM {IMPL}._install_nearest(d);
    END LOOP;
END
$do$""")


def downgrade() -> None:
    op.execute(f"""
DO $do$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
             WHERE p.pronamespace = '{IMPL}'::regnamespace AND p.proname ~ '^nearest_[0-9]+$' LOOP
        EXECUTE format('DROP FUNCTION %s', f);
    END LOOP;
END
$do$""")
    for name, identity in _REPLACED:
        op.execute(f"DROP FUNCTION {IMPL}.{name}({identity})")
        op.execute(f"ALTER FUNCTION {IMPL}.{name}_0002({identity}) RENAME TO {name}")
    op.execute(f"DROP FUNCTION {IMPL}._nearest(text, vector, integer, text, text, bigint)")
    op.execute(f"DROP FUNCTION {IMPL}._build_dispatch()")
    op.execute(f"DROP FUNCTION {IMPL}._nearest_dynamic(integer, {_NEAREST_ARGS})")
    for fn in ("_drop_nearest(integer)", "_install_nearest(integer)", "_nearest_body(text, text, text, text)",
               "_nearest_query(integer, text, boolean, boolean, text, text)",
               "_index_precision(integer)"):
        op.execute(f"DROP FUNCTION {IMPL}.{fn}")
    op.execute(f"DROP TYPE {IMPL}.hit")
    op.drop_index(CATEGORY_INDEX, table_name="embeddings")
