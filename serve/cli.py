"""``instructloop serve run``: start the inference server (imports stay inside the command)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="The inference server (TGI protocol, continuous batching, hot-swap).", no_args_is_help=True
)


@app.command("run")
def run(
    port: int | None = typer.Option(None, help="Port (default 8080; env INSTRUCTLOOP_SERVE_PORT)."),
    host: str | None = typer.Option(
        None, help="Bind address (default 127.0.0.1; any other needs INSTRUCTLOOP_SERVE_AUTH_TOKEN)."
    ),
    model: str | None = typer.Option(None, help="`default`, an HF model folder or a hub id."),
    device: str | None = typer.Option(None, help="auto, cpu, cuda, cuda:N."),
    dtype: str | None = typer.Option(None, help="auto, float32, bfloat16, float16."),
    registry_dir: Path | None = typer.Option(None, help="Policy registry to follow for hot-swaps."),
    redis_url: str | None = typer.Option(None, help="Redis with the current-policy key and channel."),
    max_batch_size: int | None = typer.Option(None, help="Sequences decoded together."),
    max_queue: int | None = typer.Option(None, help="Waiting requests before 429."),
) -> None:
    """Start serve on one policy version and follow the registry's current pointer."""
    import uvicorn
    from pydantic import ValidationError

    from instructloop.logs import configure_logging, redact_url
    from instructloop.model import ModelNotAvailable
    from instructloop.wire import SERVE_KEEP_ALIVE_S
    from serve.settings import Settings

    overrides = {
        k: v
        for k, v in dict(
            port=port,
            host=host,
            model=model,
            device=device,
            dtype=dtype,
            registry_dir=registry_dir,
            redis_url=redis_url,
            max_batch_size=max_batch_size,
            max_queue=max_queue,
        ).items()
        if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        typer.echo(redact_url(f"error: invalid serve settings:\n{exc}"), err=True)
        raise typer.Exit(2) from exc
    configure_logging(settings.log_level, settings.json_logs)
    from serve.app import create_app

    try:
        application = create_app(settings)
    except ModelNotAvailable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    uvicorn.run(
        application,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=SERVE_KEEP_ALIVE_S,
    )
