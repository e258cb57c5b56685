"""The ``instructloop`` command: one subcommand per deployable plus model and stack helpers.

Each room owns its own typer app in ``<room>/cli.py`` (imports kept light; heavy imports happen inside
commands) and this module only mounts them, so ``--help`` stays fast.
"""

from __future__ import annotations

import importlib
import importlib.util

import typer

from instructloop.logs import configure_logging
from instructloop.stack import up

app = typer.Typer(
    name="instructloop",
    help="InstructGPT as a running service: serve, gateway, learner.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command("up")(up)
model_app = typer.Typer(help="The default model and model folders.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("prepare")
def model_prepare(
    force: bool = typer.Option(False, help="Convert again even if the folder is already prepared."),
) -> None:
    """Convert the embedded SmolLM2-135M-Instruct GGUF into a plain HF folder (once) and print its path."""
    from instructloop.model import ModelNotAvailable, prepare_default_model

    configure_logging("INFO", json_logs=False)
    try:
        path = prepare_default_model(force=force)
    except ModelNotAvailable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(str(path))


# (module, subcommand name, help) — a room that is not installed is simply not mounted.
_ROOMS = [
    ("serve.cli", "serve", "The inference server (TGI protocol, continuous batching, hot-swap)."),
    ("gateway.cli", "gateway", "The OpenAI-compatible gateway (completions, feedback, admin)."),
    ("learner.cli", "learner", "The learner (reward model, PPO-ptx, gate, publish)."),
    ("gateway.labeler", "labeler", "A scripted labeler: ranks completions over the gateway API, measures win-rate."),
]

for module_name, name, help_text in _ROOMS:
    if importlib.util.find_spec(module_name.split(".")[0]) is None:
        continue
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            continue
        raise
    app.add_typer(module.app, name=name, help=help_text)


if __name__ == "__main__":
    app()
