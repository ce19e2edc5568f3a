"""``enrich retrain build-pairs | train | build-embedder-data | embedder | promote | list``: the DPO
loop and the embedder loop from merchant feedback, on demand; ``enrich models list``."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import typer

from db.engine import session_scope
from workers.cli.errors import CliError, one_line_errors
from workers.settings import Settings, get_settings

if TYPE_CHECKING:  # the commands import tasks modules on first use, not when the CLI starts
    from sqlalchemy.orm import Session, sessionmaker

    from tasks.io.blobs import BlobStore

retrain_app = typer.Typer(help="Preference pairs from merchant feedback, DPO candidates, promotion.",
                          no_args_is_help=True)


def _factory() -> sessionmaker[Session]:
    """The maintenance role's sessions (``ENRICH_DB__ADMIN_ROLE``): building pairs reads every
    tenant's feedback in the system scope, which the owner's connection would not see."""
    from workers.database import get_admin_session_factory

    return get_admin_session_factory()


def _datasets(settings: Settings) -> BlobStore:
    from tasks.io.blobs import open_blob_store
    from workers.storage import s3_client

    return open_blob_store(settings.datasets_uri, s3_client_factory=lambda: s3_client(settings))


@retrain_app.command("build-pairs")
def build_pairs() -> None:
    """Build a dataset from the feedback received since the last one (what beat runs periodically)."""
    from tasks.feedback.pairs import build_preference_pairs
    from workers.wiring import retrain_config

    settings = get_settings()
    with one_line_errors(), session_scope(_factory()) as session:
        result = build_preference_pairs(session, _datasets(settings), retrain_config(settings))
    if result.name:
        typer.echo(f"dataset {result.name}: {result.pairs} pairs at {result.uri} (feedback through id "
                   f"{result.watermark}); dropped {json.dumps(result.dropped, sort_keys=True)}")
    else:
        typer.echo(f"{result.status.value}: no dataset written (watermark {result.watermark}; "
                   f"dropped {json.dumps(result.dropped, sort_keys=True)})")


@retrain_app.command("train")
def train(
    dataset: str = typer.Option(..., "--dataset", help="Dataset name (see `enrich status` or build-pairs output)."),
    steps: int | None = typer.Option(None, min=1, help="Optimizer steps (default: one epoch over the train split)."),
    epochs: int = typer.Option(1, min=1),
    beta: float = typer.Option(0.1, min=0.0, help="DPO temperature: how far the policy may move from the reference."),
    learning_rate: float = typer.Option(5e-4, min=0.0),
    lora_rank: int = typer.Option(8, min=0, help="LoRA rank (0: full fine-tuning against a frozen copy)."),
    eval_tokens: int = typer.Option(256, min=16, help="Token budget of each held-out generation."),
) -> None:
    """Run DPO on the active listing model and register the result as a candidate version."""
    from models.dpo import DpoConfig
    from models.listing import ListingGenerator
    from tasks.feedback.training import train_candidate
    from tasks.io.blobs import open_blob_store
    from workers.storage import s3_client

    settings = get_settings()
    config = DpoConfig(beta=beta, learning_rate=learning_rate, epochs=epochs, max_steps=steps, lora_rank=lora_rank)
    with one_line_errors():
        vlm_config = _active_vlm_config(settings)
        generator = ListingGenerator(vlm_config, profile=vlm_config.profile_of("vlm"))
        originals = open_blob_store(settings.originals_uri, s3_client_factory=lambda: s3_client(settings))
        store = open_blob_store(settings.model_store_uri, s3_client_factory=lambda: s3_client(settings))
        try:
            result = train_candidate(_factory(), datasets=_datasets(settings), originals=originals,
                                     generator=generator, dataset_name=dataset, model_store=store, config=config,
                                     eval_max_new_tokens=eval_tokens, crop_padding=settings.models.crop_padding)
        except (LookupError, ValueError) as exc:
            raise CliError(str(exc)) from exc
    typer.echo(f"candidate vlm version {result.model_version_id} at {result.weights_uri}")
    typer.echo(json.dumps(result.metrics, indent=2, sort_keys=True))


def _active_vlm_config(settings: Settings):  # noqa: ANN202
    """The model configuration of the active listing model (the base a candidate improves on);
    this worker's configured one when the registry has none yet."""
    from db.engine import system_session
    from db.repositories import model_versions
    from tasks.pipeline.serving import config_for, version_ref
    from workers.wiring import model_config

    base = model_config(settings)
    with system_session(_factory()) as session:
        active = model_versions.active(session).get("vlm")
        return config_for(base, {"vlm": version_ref(active)}) if active is not None else base


@retrain_app.command("promote")
def promote(
    model_version: int = typer.Option(..., "--model-version", help="Candidate vlm or clip version id."),
    force: bool = typer.Option(False, "--force", help="Promote although the gate refuses (needs --reason)."),
    reason: str | None = typer.Option(None, "--reason", help="Why the gate is overridden (recorded on the version)."),
) -> None:
    """Promote a candidate if it beats the active version on held-out data (the gate); a clip candidate
    is then rolled out: backfill, compare, activate."""
    from tasks.feedback.promotion import PromotionError
    from tasks.feedback.promotion import promote as promote_version

    settings = get_settings()
    with one_line_errors():
        try:
            with session_scope(_factory()) as session:
                decision = promote_version(session, model_version, margin=settings.models.promotion_margin,
                                           force=force, reason=reason)
        except PromotionError as exc:
            raise CliError(str(exc)) from exc
    if not decision.promoted:
        raise CliError(f"{decision.kind} version {model_version} not promoted: " + "; ".join(decision.reasons)
                       + " (the decision is recorded; --force --reason \"…\" overrides)")
    if decision.rollout_required:
        _roll_out_clip(settings, model_version, decision)
        return
    forced = f" (forced over: {'; '.join(decision.reasons)})" if decision.forced else ""
    retired = f"; version {decision.retired_version_id} retired" if decision.retired_version_id else ""
    typer.echo(f"vlm version {model_version} is active{retired}{forced}")


@retrain_app.command("list")
def list_versions(kind: str = typer.Option("vlm", help="detector, vlm or clip.")) -> None:
    """Model versions of one kind with status, held-out metrics and the last gate decision."""
    from db.engine import system_session
    from db.repositories import model_versions

    with one_line_errors(), system_session(_factory()) as session:
        rows = model_versions.of_kind(session, kind)
        lines = [_version_line(r) for r in rows]
    for line in lines or [f"no {kind} versions registered"]:
        typer.echo(line)


_CLIP_FIGURES = ("hits@1", "hits@5", "mrr", "text_recall@5", "zero_shot_accuracy", "attribute_hits@5")


def _figures(held: dict, base: dict) -> str:  # noqa: ANN001
    accuracy = held.get("field_accuracy")
    if isinstance(accuracy, int | float):
        return f"  field_accuracy {accuracy:.3f} (base {base.get('field_accuracy', float('nan')):.3f})"
    shown = [f"{name} {held[name]:.3f} (base {base[name]:.3f})" for name in _CLIP_FIGURES
             if isinstance(held.get(name), int | float) and isinstance(base.get(name), int | float)]
    return ("  held-out " + ", ".join(shown)) if shown else ""


def _version_line(row) -> str:  # noqa: ANN001
    held = (row.metrics or {}).get("holdout") or {}
    base = (row.metrics or {}).get("base_holdout") or {}
    gate = (row.metrics or {}).get("gate") or {}
    figures = _figures(held, base)
    decision = ""
    if gate:
        passed = "approved for rollout" if gate.get("rollout_required") and row.status != "active" else "promoted"
        decision = "  gate: " + (passed + (" (forced: " + str(gate.get("reason")) + ")" if gate.get("forced") else "")
                                 if gate.get("promoted") else "refused: " + "; ".join(gate.get("reasons") or []))
    weights = "random" if row.random_weights else "real"
    return f"{row.id:>4}  {row.status:<10} {weights:<6} {row.name}@{row.revision}{figures}{decision}"


# --- the embedder loop ------------------------------------------------------------------------------


@retrain_app.command("build-embedder-data")
def build_embedder_data(
    holdout_fraction: float | None = typer.Option(None, min=0.0, max=0.99, help="Share of products held out "
                                                   "(default ENRICH_WORKERS__RETRAIN_HOLDOUT_FRACTION)."),
) -> None:
    """Build an embedder dataset from the listings accepted or edited since the last run."""
    from datetime import timedelta

    from tasks.feedback.embedder_data import EmbedderDataConfig, build_embedder_dataset

    settings = get_settings()
    w = settings.workers
    config = EmbedderDataConfig(window_days=w.retrain_window_days, settle=timedelta(seconds=w.retrain_settle_s),
                                holdout_fraction=w.retrain_holdout_fraction if holdout_fraction is None
                                else holdout_fraction)
    with one_line_errors(), session_scope(_factory()) as session:
        result = build_embedder_dataset(session, _datasets(settings), config)
    if result.name:
        typer.echo(f"dataset {result.name}: {result.pairs} rows at {result.uri} (reviews through id "
                   f"{result.watermark}); dropped {json.dumps(result.dropped, sort_keys=True)}")
    else:
        typer.echo(f"{result.status.value}: no dataset written (reviews through id {result.watermark}; "
                   f"dropped {json.dumps(result.dropped, sort_keys=True)})")


@retrain_app.command("embedder")
def embedder(
    dataset: str = typer.Option(..., "--dataset", help="Embedder dataset name (from build-embedder-data)."),
    epochs: int = typer.Option(5, min=1),
    batch_size: int = typer.Option(64, min=2),
    learning_rate: float = typer.Option(1e-4, min=0.0, help="AdamW peak learning rate (1e-3 suits from-scratch)."),
    trainable: str = typer.Option("all", help="all | last-blocks (the last block of each tower + projections)."),
    max_seconds: float = typer.Option(0.0, min=0.0, help="Wall-clock budget (0 = none)."),
    seed: int = typer.Option(0),
) -> None:
    """Contrastive fine-tune of the active clip embedder; registers a candidate with held-out metrics."""
    from models.embedder_training import ContrastiveConfig
    from tasks.feedback.embedder_finetune import finetune_candidate
    from tasks.io.blobs import open_blob_store
    from workers.storage import s3_client

    settings = get_settings()
    with one_line_errors():
        try:
            config = ContrastiveConfig(epochs=epochs, batch_size=batch_size, lr=learning_rate, trainable=trainable,
                                       max_seconds=max_seconds or None, seed=seed)
            clip = _active_clip(settings)
            originals = open_blob_store(settings.originals_uri, s3_client_factory=lambda: s3_client(settings))
            store = open_blob_store(settings.model_store_uri, s3_client_factory=lambda: s3_client(settings))
            result = finetune_candidate(_factory(), datasets=_datasets(settings), originals=originals, embedder=clip,
                                        dataset_name=dataset, model_store=store, config=config,
                                        padding=settings.models.crop_padding)
        except (LookupError, ValueError) as exc:
            raise CliError(str(exc)) from exc
    typer.echo(f"candidate clip version {result.model_version_id} at {result.weights_uri}")
    held, base = result.metrics["holdout"], result.metrics["base_holdout"]
    typer.echo(json.dumps({"holdout": {k: v for k, v in held.items() if k != "detail"},
                           "base_holdout": {k: v for k, v in base.items() if k != "detail"},
                           "training": result.metrics["training"]}, indent=2, sort_keys=True))


def _active_clip(settings: Settings):  # noqa: ANN202
    from db.engine import system_session
    from db.repositories import model_versions
    from models.factory import build_models
    from tasks.pipeline.serving import config_for, version_ref
    from workers.wiring import model_config

    base = model_config(settings)
    with system_session(_factory()) as session:
        active = model_versions.active(session).get("clip")
        config = config_for(base, {"clip": version_ref(active)}) if active is not None else base
    return build_models(config).embedder


def _roll_out_clip(settings: Settings, version_id: int, decision) -> None:  # noqa: ANN001
    """The gate approved a clip candidate: backfill → compare → activate (resumable: run promote again)."""
    from db.engine import system_session
    from db.repositories import model_versions
    from tasks.feedback.embedder_rollout import RolloutRefused, roll_out
    from workers.cli.embeddings import ensure_size_indexes, load_embedder

    with system_session(_factory()) as session:
        row = model_versions.get(session, version_id)
        ref, dims = row.weights_uri, int(row.dims or 0)
    ensure_size_indexes(settings, dims)  # the configured precision and graph, as the backfill builds them
    _, embed = load_embedder(ref, settings, "pretrained")
    try:
        result = roll_out(_factory(), version_id, embed)
    except RolloutRefused as exc:
        raise CliError(str(exc)) from exc
    retired = f"; version {result.retired_version_id} retired" if result.retired_version_id else ""
    forced = f" (forced over: {'; '.join(decision.reasons)})" if decision.forced else ""
    typer.echo(f"clip version {version_id} passed the gate{forced}, backfilled {result.written} rows "
               f"(coverage {result.coverage:.1%}, HNSW recall {result.recall_at_k}) and is active{retired}")


models_app = typer.Typer(help="The model registry: every version of every kind.", no_args_is_help=True)


@models_app.command("list")
def models_list(kind: str | None = typer.Option(None, help="Only this kind (detector, vlm, clip).")) -> None:
    """Every registered model version with status, held-out metrics and the last gate decision."""
    from db.engine import system_session
    from db.repositories import model_versions

    kinds = [kind] if kind else ["detector", "vlm", "clip"]
    with one_line_errors(), system_session(_factory()) as session:
        lines = [(k, _version_line(r)) for k in kinds for r in model_versions.of_kind(session, k)]
    for k, line in lines or [("", "no model versions registered")]:
        typer.echo(f"{k:<9}{line}")


def register(app: typer.Typer) -> None:
    app.add_typer(retrain_app, name="retrain")
    app.add_typer(models_app, name="models")
