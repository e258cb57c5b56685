"""The ``instructloop`` command: one subcommand per room plus the stack (``up``) and the default model.

The launcher is the one room that may import every other room, and it does so here, visibly: each
room owns its typer app in ``<room>/cli.py`` (imports kept light; heavy imports happen inside commands),
so ``--help`` stays fast.
"""

from __future__ import annotations

import typer

from gateway.cli import app as gateway_app
from instructloop.logs import configure_logging
from labeler.cli import app as labeler_app
from launcher.stack import up
from learner.cli import app as learner_app
from serve.cli import app as serve_app

app = typer.Typer(
    name="instructloop",
    help="InstructGPT as a running service: serve, gateway, learner.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command("up")(up)
model_app = typer.Typer(help="The default model and model folders.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(
    serve_app, name="serve", help="The inference server (TGI protocol, continuous batching, hot-swap)."
)
app.add_typer(
    gateway_app, name="gateway", help="The OpenAI-compatible gateway (completions, feedback, admin)."
)
app.add_typer(learner_app, name="learner", help="The learner (reward model, PPO-ptx, gate, publish).")
app.add_typer(
    labeler_app,
    name="labeler",
    help="A scripted labeler: ranks completions over the gateway API, measures win-rate.",
)


@model_app.command("prepare")
def model_prepare(
    force: bool = typer.Option(False, help="Convert again even if the folder is already prepared."),
    tokenizer_only: bool = typer.Option(
        False, help="Save only the fixed tokenizer (what the gateway needs)."
    ),
) -> None:
    """Convert the embedded SmolLM2-135M-Instruct GGUF into a plain HF folder (once) and print its path."""
    from instructloop.model import ModelNotAvailable, prepare_default_model, prepare_default_tokenizer

    configure_logging("INFO", json_logs=False)
    try:
        path = prepare_default_tokenizer() if tokenizer_only else prepare_default_model(force=force)
    except ModelNotAvailable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(str(path))


if __name__ == "__main__":
    app()
