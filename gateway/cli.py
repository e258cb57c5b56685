"""``instructloop gateway``: run the gateway, manage API keys (imports stay inside the commands)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="The OpenAI-compatible gateway (completions, feedback, admin).", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (stored hashed in a 0600 JSON-lines file).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _keys_file(path: Path | None) -> Path:
    import os

    from gateway.settings import ENV_PREFIX, default_keys_file

    if path is not None:
        return path
    env = os.environ.get(f"{ENV_PREFIX}KEYS_FILE")
    return Path(env) if env else default_keys_file()


@keys_app.command("create")
def keys_create(
    name: str = typer.Option(..., help="Who the key is for (shown in logs and as labeler name)."),
    role: str = typer.Option("user", help="user, labeler or admin."),
    keys_file: Path | None = typer.Option(
        None,
        help="Keys file (default: $INSTRUCTLOOP_GATEWAY_KEYS_FILE or "
        "~/.cache/instructloop/gateway/keys.jsonl).",
    ),
) -> None:
    """Create a key, append its hash to the keys file and print the key once (it is not stored)."""
    from gateway.auth import Role, append_key

    try:
        parsed_role = Role(role)
    except ValueError:
        typer.echo(f"error: unknown role {role!r}: use --role user, --role labeler or --role admin", err=True)
        raise typer.Exit(2) from None
    path = _keys_file(keys_file)
    try:
        key, record = append_key(path, name=name, role=parsed_role)
    except (ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(key)
    typer.echo(
        f"created {parsed_role.value} key {record.key_id} for {name!r} in {path} "
        "(this is the only time the key is shown)",
        err=True,
    )


@keys_app.command("list")
def keys_list(keys_file: Path | None = typer.Option(None, help="Keys file.")) -> None:
    """Key ids, names and roles (never the keys)."""
    from gateway.auth import read_keys

    path = _keys_file(keys_file)
    if not path.exists():
        typer.echo(
            f"error: {path} does not exist; create a key with `instructloop gateway keys create`", err=True
        )
        raise typer.Exit(2)
    try:
        records = read_keys(path)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    for record in records:
        typer.echo(f"{record.key_id}  {record.role.value:8}  {record.name}")


@app.command("run")
def run(
    port: int | None = typer.Option(None, help="Port (default 8000; env INSTRUCTLOOP_GATEWAY_PORT)."),
    host: str | None = typer.Option(None, help="Bind address (default 127.0.0.1)."),
    backends: str | None = typer.Option(None, help="Comma-separated serve / TGI URLs."),
    redis_url: str | None = typer.Option(None, help="Redis for streams, completions, rate limits."),
    keys_file: Path | None = typer.Option(
        None, help="Keys file made with `instructloop gateway keys create`."
    ),
    dev_mode: bool | None = typer.Option(
        None, "--dev-mode/--no-dev-mode", help="Accept the dev admin key (local only)."
    ),
    workers: int | None = typer.Option(None, help="Worker processes (default 1; each has its own /metrics)."),
) -> None:
    """Start the gateway."""
    import uvicorn
    from pydantic import ValidationError

    from gateway.settings import Settings
    from instructloop.logs import configure_logging

    overrides = {
        k: v
        for k, v in dict(
            port=port,
            host=host,
            backends=backends,
            redis_url=redis_url,
            keys_file=keys_file,
            dev_mode=dev_mode,
            workers=workers,
        ).items()
        if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        messages = "\n".join(f"  - {e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
        typer.echo(f"error: invalid gateway settings:\n{messages}", err=True)
        raise typer.Exit(2) from exc
    configure_logging(settings.log_level, settings.json_logs)
    if settings.workers > 1:
        # each worker process builds its own app from the environment: hand the overrides down that way
        import os

        from gateway.settings import ENV_PREFIX

        for name, value in overrides.items():
            os.environ[f"{ENV_PREFIX}{name.upper()}"] = (
                str(value).lower() if isinstance(value, bool) else str(value)
            )
        uvicorn.run(
            "gateway.app:create_app_from_env",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_config=None,
            timeout_graceful_shutdown=10,
        )
        return
    from gateway.app import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=10,
    )
