"""The enrichment pipeline: intake → fetch (cpu) → model (gpu) → persist (cpu), its job state,
outbox and reconciler. ``jobs.STAGES`` is the one place its shape is written."""
