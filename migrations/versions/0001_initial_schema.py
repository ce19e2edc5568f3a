"""initial schema: pgvector extension, every table, HNSW indexes

The embedding columns have no fixed dimension (model versions of any size live side by side);
their HNSW indexes are partial expression indexes per dimension. 512 (ViT-B-32, the default
CLIP) is created here; other sizes get theirs when a model version of that size is registered
(db.vector_indexes.ensure_dimension_index).

Revision ID: 0001
Revises:
Create Date: 2026-11-22 17:10:31.486368
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
import pgvector.sqlalchemy

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


DEFAULT_DIMS = 512


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.create_table('dead_letters',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=128), nullable=True),
    sa.Column('queue', sa.String(length=128), nullable=False),
    sa.Column('routing_key', sa.String(length=128), nullable=True),
    sa.Column('reason', sa.String(length=64), nullable=False),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.Column('headers', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('body', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_dead_letters'))
    )
    op.create_table('inbox_events',
    sa.Column('event_id', sa.UUID(), nullable=False),
    sa.Column('tenant_id', sa.String(length=128), nullable=True),
    sa.Column('event_type', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("status IN ('accepted', 'rejected', 'stale')", name=op.f('ck_inbox_events_status')),
    sa.PrimaryKeyConstraint('event_id', name=op.f('pk_inbox_events'))
    )
    op.create_table('model_versions',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('name', sa.String(length=256), nullable=False),
    sa.Column('revision', sa.String(length=128), nullable=False),
    sa.Column('profile', sa.String(length=32), nullable=False),
    sa.Column('random_weights', sa.Boolean(), nullable=False),
    sa.Column('dims', sa.SmallInteger(), nullable=True),
    sa.Column('status', sa.String(length=16), server_default='candidate', nullable=False),
    sa.Column('params', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('metrics', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('activated_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("kind IN ('detector', 'vlm', 'clip')", name=op.f('ck_model_versions_kind')),
    sa.CheckConstraint("status IN ('candidate', 'backfilling', 'active', 'retired')", name=op.f('ck_model_versions_status')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_versions')),
    sa.UniqueConstraint('kind', 'name', 'revision', name=op.f('uq_model_versions_kind_name_revision'))
    )
    op.create_index('uq_model_versions_one_active', 'model_versions', ['kind'], unique=True, postgresql_where=sa.text("status = 'active'"))
    op.create_table('outbox',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=128), nullable=True),
    sa.Column('message_id', sa.UUID(), nullable=False),
    sa.Column('routing_key', sa.String(length=64), nullable=False),
    sa.Column('payload', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('published_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('publish_attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox')),
    sa.UniqueConstraint('message_id', name=op.f('uq_outbox_message_id'))
    )
    op.create_index('ix_outbox_unpublished', 'outbox', ['id'], unique=False, postgresql_where=sa.text('published_at IS NULL'))
    op.create_table('tenants',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tenants'))
    )
    op.create_table('training_datasets',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('uri', sa.Text(), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('manifest', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('watermark_feedback_id', sa.BigInteger(), nullable=False),
    sa.Column('window_start', sa.DateTime(timezone=True), nullable=True),
    sa.Column('window_end', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_training_datasets')),
    sa.UniqueConstraint('name', name=op.f('uq_training_datasets_name'))
    )
    op.create_table('images',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=128), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('phash', pgvector.sqlalchemy.bit.BIT(length=64), nullable=False),
    sa.Column('dhash', pgvector.sqlalchemy.bit.BIT(length=64), nullable=False),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('height', sa.Integer(), nullable=False),
    sa.Column('byte_size', sa.BigInteger(), nullable=False),
    sa.Column('format', sa.String(length=16), nullable=False),
    sa.Column('storage_uri', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_images_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_images')),
    sa.UniqueConstraint('tenant_id', 'sha256', name=op.f('uq_images_tenant_id_sha256'))
    )
    op.create_table('merchants',
    sa.Column('tenant_id', sa.String(length=128), nullable=False),
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_merchants_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('tenant_id', 'id', name=op.f('pk_merchants'))
    )
    op.create_table('duplicate_groups',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=128), nullable=False),
    sa.Column('representative_image_id', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['representative_image_id'], ['images.id'], name=op.f('fk_duplicate_groups_representative_image_id_images')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_duplicate_groups_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_duplicate_groups')),
    sa.UniqueConstraint('representative_image_id', name=op.f('uq_duplicate_groups_representative_image_id'))
    )
    op.create_table('groundings',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=128), nullable=False),
    sa.Column('image_id', sa.BigInteger(), nullable=False),
    sa.Column('model_version_id', sa.Integer(), nullable=False),
    sa.Column('prompt', sa.Text(), nullable=False),
    sa.Column('box', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('score', sa.Float(), nullable=True),
    sa.Column('fallback', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_groundings_image_id_images')),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_groundings_model_version_id_model_versions')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_groundings_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_groundings')),
    sa.UniqueConstraint('tenant_id', 'image_id', 'model_version_id', 'prompt', name=op.f('uq_groundings_tenant_id_image_id_model_version_id_prompt'))
    )
    op.create_table('products',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=128), nullable=False),
    sa.Column('merchant_id', sa.String(length=128), nullable=False),
    sa.Column('external_id', sa.String(length=256), nullable=False),
    sa.Column('version', sa.BigInteger(), nullable=False),
    sa.Column('category', sa.String(length=64), nullable=False),
    sa.Column('title', sa.Text(), server_default='', nullable=False),
    sa.Column('description', sa.Text(), server_default='', nullable=False),
    sa.Column('attributes', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('locale', sa.String(length=16), server_default='en', nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('version >= 0', name=op.f('ck_products_version_non_negative')),
    sa.ForeignKeyConstraint(['tenant_id', 'merchant_id'], ['merchants.tenant_id', 'merchants.id'], name=op.f('fk_products_tenant_id_merchants')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_products_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_products')),
    sa.UniqueConstraint('tenant_id', 'external_id', name=op.f('uq_products_tenant_id_external_id'))
    )
    op.create_table('duplicate_members',
    sa.Column('group_id', sa.BigInteger(), nullable=False),
    sa.Column('image_id', sa.BigInteger(), nullable=False),
    sa.Column('tenant_id', sa.String(length=128), nullable=False),
    sa.Column('method', sa.String(length=16), nullable=False),
    sa.Column('hamming_distance', sa.SmallInteger(), nullable=True),
    sa.Column('inliers', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("method IN ('exact', 'near')", name=op.f('ck_duplicate_members_method')),
    sa.ForeignKeyConstraint(['group_id'], ['duplicate_groups.id'], name=op.f('fk_duplicate_members_group_id_duplicate_groups'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_duplicate_members_image_id_images')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_duplicate_members_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('group_id', 'image_id', name=op.f('pk_duplicate_members')),
    sa.UniqueConstraint('image_id', name=op.f('uq_duplicate_members_image_id'))
    )
    op.create_table('listings',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=128), nullable=False),
    sa.Column('product_id', sa.BigInteger(), nullable=False),
    sa.Column('product_version', sa.BigInteger(), nullable=False),
    sa.Column('model_version_id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.BigInteger(), nullable=False),
    sa.Column('grounding_id', sa.BigInteger(), nullable=True),
    sa.Column('category', sa.String(length=64), nullable=False),
    sa.Column('schema_id', sa.String(length=64), nullable=False),
    sa.Column('content', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('dropped_attributes', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('model_output', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('model_input', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('model_versions', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('random_weights', sa.Boolean(), nullable=False),
    sa.Column('status', sa.String(length=16), server_default='proposed', nullable=False),
    sa.Column('reviewed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("status IN ('proposed', 'accepted', 'edited', 'rejected')", name=op.f('ck_listings_status')),
    sa.ForeignKeyConstraint(['grounding_id'], ['groundings.id'], name=op.f('fk_listings_grounding_id_groundings')),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_listings_image_id_images')),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_listings_model_version_id_model_versions')),
    sa.ForeignKeyConstraint(['product_id'], ['products.id'], name=op.f('fk_listings_product_id_products'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_listings_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_listings')),
    sa.UniqueConstraint('tenant_id', 'product_id', 'product_version', 'model_version_id', name=op.f('uq_listings_tenant_id_product_id_product_version_model_version_id'))
    )
    op.create_table('product_images',
    sa.Column('tenant_id', sa.String(length=128), nullable=False),
    sa.Column('product_id', sa.BigInteger(), nullable=False),
    sa.Column('product_version', sa.BigInteger(), nullable=False),
    sa.Column('position', sa.SmallInteger(), nullable=False),
    sa.Column('image_id', sa.BigInteger(), nullable=False),
    sa.Column('role', sa.String(length=32), server_default='primary', nullable=False),
    sa.Column('source_url', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_product_images_image_id_images')),
    sa.ForeignKeyConstraint(['product_id'], ['products.id'], name=op.f('fk_product_images_product_id_products'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_product_images_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('product_id', 'product_version', 'position', name=op.f('pk_product_images'))
    )
    op.create_index(op.f('ix_product_images_image_id'), 'product_images', ['image_id'], unique=False)
    op.create_table('embeddings',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=128), nullable=False),
    sa.Column('product_id', sa.BigInteger(), nullable=False),
    sa.Column('listing_id', sa.BigInteger(), nullable=False),
    sa.Column('model_version_id', sa.Integer(), nullable=False),
    sa.Column('category', sa.String(length=64), nullable=False),
    sa.Column('dims', sa.SmallInteger(), nullable=False),
    sa.Column('image_embedding', pgvector.sqlalchemy.vector.VECTOR(), nullable=False),
    sa.Column('text_embedding', pgvector.sqlalchemy.vector.VECTOR(), nullable=False),
    sa.Column('text_input', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['listing_id'], ['listings.id'], name=op.f('fk_embeddings_listing_id_listings'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_embeddings_model_version_id_model_versions')),
    sa.ForeignKeyConstraint(['product_id'], ['products.id'], name=op.f('fk_embeddings_product_id_products'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_embeddings_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_embeddings')),
    sa.UniqueConstraint('listing_id', 'model_version_id', name=op.f('uq_embeddings_listing_id_model_version_id'))
    )
    op.create_table('enrichment_jobs',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=128), nullable=False),
    sa.Column('event_id', sa.UUID(), nullable=False),
    sa.Column('product_id', sa.BigInteger(), nullable=False),
    sa.Column('product_version', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.String(length=16), server_default='pending', nullable=False),
    sa.Column('stage', sa.String(length=16), nullable=True),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('error_detail', sa.Text(), nullable=True),
    sa.Column('retryable', sa.Boolean(), nullable=True),
    sa.Column('attempts', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('timings_ms', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('work', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('listing_id', sa.BigInteger(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("status <> 'failed' OR error_code IS NOT NULL", name=op.f('ck_enrichment_jobs_failed_has_code')),
    sa.CheckConstraint("status IN ('pending', 'running', 'done', 'failed', 'superseded')", name=op.f('ck_enrichment_jobs_status')),
    sa.ForeignKeyConstraint(['event_id'], ['inbox_events.event_id'], name=op.f('fk_enrichment_jobs_event_id_inbox_events')),
    sa.ForeignKeyConstraint(['listing_id'], ['listings.id'], name=op.f('fk_enrichment_jobs_listing_id_listings'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['product_id'], ['products.id'], name=op.f('fk_enrichment_jobs_product_id_products'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_enrichment_jobs_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_enrichment_jobs')),
    sa.UniqueConstraint('event_id', name=op.f('uq_enrichment_jobs_event_id'))
    )
    op.create_index('ix_enrichment_jobs_status', 'enrichment_jobs', ['status'], unique=False)
    op.create_table('preference_pairs',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=128), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('listing_id', sa.BigInteger(), nullable=False),
    sa.Column('product_id', sa.BigInteger(), nullable=False),
    sa.Column('merchant_id', sa.String(length=128), nullable=False),
    sa.Column('category', sa.String(length=64), nullable=False),
    sa.Column('source', sa.String(length=32), nullable=False),
    sa.Column('split', sa.String(length=16), nullable=False),
    sa.Column('pair_hash', sa.String(length=64), nullable=False),
    sa.Column('prompt', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('chosen', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('rejected', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("source IN ('merchant_correction', 'verification_drop')", name=op.f('ck_preference_pairs_source')),
    sa.CheckConstraint("split IN ('train', 'holdout')", name=op.f('ck_preference_pairs_split')),
    sa.ForeignKeyConstraint(['dataset_id'], ['training_datasets.id'], name=op.f('fk_preference_pairs_dataset_id_training_datasets'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['listing_id'], ['listings.id'], name=op.f('fk_preference_pairs_listing_id_listings'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['product_id'], ['products.id'], name=op.f('fk_preference_pairs_product_id_products'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_preference_pairs_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_preference_pairs')),
    sa.UniqueConstraint('pair_hash', name=op.f('uq_preference_pairs_pair_hash'))
    )
    op.create_table('review_feedback',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=128), nullable=False),
    sa.Column('event_id', sa.UUID(), nullable=False),
    sa.Column('listing_id', sa.BigInteger(), nullable=False),
    sa.Column('decision', sa.String(length=16), nullable=False),
    sa.Column('reviewer', sa.String(length=256), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('corrected', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("decision IN ('accepted', 'edited', 'rejected')", name=op.f('ck_review_feedback_decision')),
    sa.ForeignKeyConstraint(['listing_id'], ['listings.id'], name=op.f('fk_review_feedback_listing_id_listings'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_review_feedback_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_review_feedback')),
    sa.UniqueConstraint('event_id', name=op.f('uq_review_feedback_event_id'))
    )
    op.create_table('field_errors',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=128), nullable=False),
    sa.Column('feedback_id', sa.BigInteger(), nullable=False),
    sa.Column('listing_id', sa.BigInteger(), nullable=False),
    sa.Column('category', sa.String(length=64), nullable=False),
    sa.Column('field', sa.String(length=128), nullable=False),
    sa.Column('model_value', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('merchant_value', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('model_versions', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['feedback_id'], ['review_feedback.id'], name=op.f('fk_field_errors_feedback_id_review_feedback'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['listing_id'], ['listings.id'], name=op.f('fk_field_errors_listing_id_listings'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_field_errors_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_field_errors')),
    sa.UniqueConstraint('feedback_id', 'field', name=op.f('uq_field_errors_feedback_id_field'))
    )
    op.execute(
        "CREATE INDEX ix_images_phash_hnsw ON images USING hnsw (phash bit_hamming_ops)"
    )
    op.execute(
        "CREATE INDEX ix_images_dhash_hnsw ON images USING hnsw (dhash bit_hamming_ops)"
    )
    for column in ("image_embedding", "text_embedding"):
        op.execute(
            f"CREATE INDEX ix_embeddings_{column}_{DEFAULT_DIMS}_hnsw ON embeddings USING hnsw "
            f"(({column}::vector({DEFAULT_DIMS})) vector_cosine_ops) WHERE dims = {DEFAULT_DIMS}"
        )


def downgrade() -> None:
    op.drop_table('field_errors')
    op.drop_table('review_feedback')
    op.drop_table('preference_pairs')
    op.drop_index('ix_enrichment_jobs_status', table_name='enrichment_jobs')
    op.drop_table('enrichment_jobs')
    op.drop_table('embeddings')
    op.drop_index(op.f('ix_product_images_image_id'), table_name='product_images')
    op.drop_table('product_images')
    op.drop_table('listings')
    op.drop_table('duplicate_members')
    op.drop_table('products')
    op.drop_table('groundings')
    op.drop_table('duplicate_groups')
    op.drop_table('merchants')
    op.drop_table('images')
    op.drop_table('training_datasets')
    op.drop_table('tenants')
    op.drop_index('ix_outbox_unpublished', table_name='outbox', postgresql_where=sa.text('published_at IS NULL'))
    op.drop_table('outbox')
    op.drop_index('uq_model_versions_one_active', table_name='model_versions', postgresql_where=sa.text("status = 'active'"))
    op.drop_table('model_versions')
    op.drop_table('inbox_events')
    op.drop_table('dead_letters')
    op.execute("DROP EXTENSION IF EXISTS vector")
