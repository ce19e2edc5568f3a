"""``enrich retrain build-pairs | train | promote``: the DPO loop from merchant feedback, on demand."""

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
    from workers.database import get_session_factory

    return get_session_factory()


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
    """Run DPO on the configured listing model and register the result as a candidate version."""
    from models.dpo import DpoConfig
    from models.listing import ListingGenerator
    from tasks.io.blobs import open_blob_store
    from tasks.feedback.training import train_candidate
    from workers.wiring import model_config
    from workers.storage import s3_client

    settings = get_settings()
    config = DpoConfig(beta=beta, learning_rate=learning_rate, epochs=epochs, max_steps=steps, lora_rank=lora_rank)
    with one_line_errors():
        generator = ListingGenerator(model_config(settings))
        originals = open_blob_store(settings.originals_uri, s3_client_factory=lambda: s3_client(settings))
        try:
            result = train_candidate(_factory(), datasets=_datasets(settings), originals=originals,
                                     generator=generator, dataset_name=dataset,
                                     output_root=settings.data_dir / "candidates" / "vlm", config=config,
                                     eval_max_new_tokens=eval_tokens)
        except (LookupError, ValueError) as exc:
            raise CliError(str(exc)) from exc
    typer.echo(f"candidate vlm version {result.model_version_id} at {result.weights_dir}")
    typer.echo(json.dumps(result.metrics, indent=2, sort_keys=True))


@retrain_app.command("promote")
def promote(model_version: int = typer.Option(..., "--model-version", help="Candidate vlm version id.")) -> None:
    """Make a candidate the active listing model, retiring the active one, atomically."""
    from tasks.feedback.training import PromotionError
    from tasks.feedback.training import promote as promote_version

    with one_line_errors():
        try:
            with session_scope(_factory()) as session:
                retired = promote_version(session, model_version)
        except PromotionError as exc:
            raise CliError(str(exc)) from exc
    typer.echo(f"vlm version {model_version} is active" + (f"; version {retired} retired" if retired else ""))


def register(app: typer.Typer) -> None:
    app.add_typer(retrain_app, name="retrain")
