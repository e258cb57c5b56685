"""``instructloop learner run|once|status|export`` (settings from ``INSTRUCTLOOP_LEARNER_*``; heavy imports
inside commands)."""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
import time
from pathlib import Path

import typer

from instructloop.logs import redact_url
from learner.export import ExportFormat, ExportKind

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
log = logging.getLogger("learner")


def _settings():
    from pydantic import ValidationError

    from learner.settings import Settings

    try:
        settings = Settings()
        settings.require_redis()
    except (ValidationError, ValueError) as exc:
        typer.echo(redact_url(f"error: invalid learner settings (INSTRUCTLOOP_LEARNER_*): {exc}"), err=True)
        raise typer.Exit(2) from exc
    return settings


def _redis_unreachable(settings, exc: Exception, waited_s: float = 0.0) -> None:
    waited = (
        f" after {waited_s:g} s (INSTRUCTLOOP_LEARNER_REDIS_CONNECT_TIMEOUT_S sets the wait)"
        if waited_s
        else ""
    )
    typer.echo(
        redact_url(
            f"error: cannot reach Redis at {settings.redis_url} ({exc}){waited}; start it or fix "
            "INSTRUCTLOOP_LEARNER_REDIS_URL"
        ),
        err=True,
    )
    raise typer.Exit(2) from exc


def _wait_for_redis(settings, client) -> None:
    """Ping Redis until it answers; after ``redis_connect_timeout_s`` exit (2) naming the URL and the knobs.
    Logs once that it waits (a pod's Redis often starts after the learner)."""
    import redis

    deadline = time.monotonic() + settings.redis_connect_timeout_s
    waiting = False
    while True:
        try:
            client.ping()
            if waiting:
                log.info("redis reachable", extra={"redis_url": redact_url(settings.redis_url)})
            return
        except redis.ConnectionError as exc:
            if time.monotonic() >= deadline:
                _redis_unreachable(settings, exc, settings.redis_connect_timeout_s)
            if not waiting:
                log.info(
                    "learner waiting for redis",
                    extra={
                        "redis_url": redact_url(settings.redis_url),
                        "error": str(exc),
                        "timeout_s": settings.redis_connect_timeout_s,
                        "knob": "INSTRUCTLOOP_LEARNER_REDIS_CONNECT_TIMEOUT_S",
                    },
                )
                waiting = True
            time.sleep(0.5)


def _learner(settings, serve_metrics: bool):
    from instructloop.logs import configure_logging
    from instructloop.model import ModelNotAvailable
    from learner.loop import Learner
    from learner.metrics import LearnerMetrics

    configure_logging(settings.log_level, json_logs=settings.json_logs)
    metrics = LearnerMetrics()
    if serve_metrics and settings.metrics_port:
        try:
            metrics.serve(settings.metrics_port)
        except OSError as exc:
            typer.echo(
                f"error: cannot serve metrics on port {settings.metrics_port} ({exc}); set "
                "INSTRUCTLOOP_LEARNER_METRICS_PORT to a free port or 0",
                err=True,
            )
            raise typer.Exit(2) from exc
    learner = Learner(settings, metrics=metrics, progress=sys.stderr.isatty())
    _wait_for_redis(settings, learner.redis)
    try:
        learner.start()
    except ModelNotAvailable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    return learner


@app.command("run")
def run(
    max_rounds: int = typer.Option(
        None, help="Stop after this many training rounds (default: run until SIGTERM)."
    ),
) -> None:
    """Ingest the streams and learn forever: RM updates, PPO-ptx rounds, gate, publish."""
    settings = _settings()
    learner = _learner(settings, serve_metrics=True)
    learner.install_signal_handlers()
    try:
        learner.run(max_rounds=max_rounds if max_rounds is not None else settings.max_rounds)
    finally:
        learner.close()


@app.command("once")
def once() -> None:
    """One round: ingest → RM update if enough new comparisons
    → PPO-ptx round if enough prompts → gate → publish."""
    settings = _settings()
    learner = _learner(settings, serve_metrics=False)
    learner.install_signal_handlers()
    try:
        report = learner.round()
    finally:
        learner.close()
    summary = {
        "ingested": report.ingest.inserted,
        "duplicates": report.ingest.duplicates,
        "dead_lettered": report.ingest.dead_lettered,
        "sft": report.sft,
        "reward": report.reward,
        "ppo": report.ppo,
        "version": report.version,
        "promoted": None if report.gate is None else report.gate.promote,
        "reasons": None if report.gate is None else report.gate.reasons,
        "duration_s": round(report.duration_s, 3),
    }
    typer.echo(json.dumps(summary))


@app.command("status")
def status() -> None:
    """Print the learner's state (counters, incumbent), dataset sizes and consumer lag as JSON."""
    settings = _settings()
    import redis

    from learner.loop import Learner

    learner = Learner(settings, progress=False)
    try:
        try:
            learner.ingestor.ensure_groups()
        except redis.ConnectionError as exc:
            _redis_unreachable(settings, exc)
        out = {
            "state": learner.state.model_dump(exclude={"history"}),
            "dataset": learner.dataset.counts(),
            "lag": learner.ingestor.update_lag(),
            "current": learner.registry.current(),
            "waiting": [w.message for w in learner.waiting()],
        }
    finally:
        learner.close()
    typer.echo(json.dumps(out, indent=2))


@app.command("export")
def export(
    out: Path = typer.Option(..., help="Folder to write into (created): <kind>.jsonl or <kind>.parquet."),
    run_dir: Path = typer.Option(
        None,
        help="The stack's run folder (instructloop up --run-dir) or the learner's state folder holding "
        "dataset.sqlite3 (default: INSTRUCTLOOP_LEARNER_STATE_DIR if it holds one, else ./run).",
    ),
    dataset: Path = typer.Option(None, help="The dataset file itself, instead of --run-dir."),
    format: ExportFormat = typer.Option(ExportFormat.jsonl, help="File format."),
    kind: ExportKind = typer.Option(
        ExportKind.all,
        help="rankings (K-wise), pairs (chosen/rejected), demonstrations (prompt/completion), or all.",
    ),
    exclude_labeler: list[str] = typer.Option(
        [], help="Leave out every event by this labeler id (repeat the option for several)."
    ),
    force: bool = typer.Option(False, help="Overwrite files of an earlier export in --out."),
) -> None:
    """Write the collected data (the learner's dataset) as K-wise rankings, chosen/rejected pairs and
    prompt/completion demonstrations, JSONL or parquet, loadable with `datasets` (schema: docs/data.md).
    Reads the dataset file only (the learner may keep running); events not yet ingested are not included."""
    from instructloop.logs import configure_logging
    from learner import export as exporting
    from learner.dataset import Dataset

    configure_logging("INFO", json_logs=False)
    kinds = kind.expand()
    started = time.monotonic()
    dataset_obj = None
    try:
        default_run_dir = Path()
        if run_dir is None and dataset is None:  # the learner's state folder, else `make run`'s ./run
            default_run_dir = _default_state_dir()
            if not (default_run_dir / exporting.DATASET_FILE).is_file() and Path("run").is_dir():
                default_run_dir = Path("run")
        path = exporting.resolve_dataset_path(run_dir, dataset, default_run_dir)
        exporting.prepare_out_dir(out, kinds, format, overwrite=force)
        dataset_obj = Dataset(path)
        log.info(
            "export: reading %s %s into %s as %s (the dataset only: events the learner has not yet ingested "
            "from the Redis streams are not included)",
            path,
            dataset_obj.counts(),
            out,
            format.value,
        )
        counts = exporting.export_dataset(dataset_obj, out, kinds, format, excluded_labelers=exclude_labeler)
    except exporting.ExportError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    except (sqlite3.Error, OSError) as exc:
        typer.echo(
            f"error: export of {dataset or run_dir or 'the learner dataset'} failed ({exc}); check the "
            "dataset file and that --out is writable",
            err=True,
        )
        raise typer.Exit(2) from exc
    finally:
        if dataset_obj is not None:
            dataset_obj.close()
    log.info("export: done in %.1f s", time.monotonic() - started)
    typer.echo(json.dumps(exporting.summary(counts), indent=2))


def _default_state_dir() -> Path:
    """The learner's ``state_dir`` from its settings (``INSTRUCTLOOP_LEARNER_STATE_DIR``); no Redis needed."""
    from pydantic import ValidationError

    from learner.settings import Settings

    try:
        return Settings().state_dir
    except ValidationError as exc:
        typer.echo(f"error: invalid learner settings (INSTRUCTLOOP_LEARNER_*): {exc}", err=True)
        raise typer.Exit(2) from exc
