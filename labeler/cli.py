"""``instructloop labeler``: simulate labelers, record a baseline, measure win-rate (HTTP only)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from instructloop.stackfile import StackFile
from labeler.client import DEFAULT_MODEL_NAME, GatewayClient, LabelerError, record, simulate
from labeler.preferences import (
    DEFAULT_HELDOUT_PROMPTS,
    DEFAULT_PROMPTS,
    PreferenceError,
    PreferenceFunction,
    load_preference,
    read_prompts,
    win_rate,
)

API_KEY_ENV = "INSTRUCTLOOP_API_KEY"
GATEWAY_URL_ENV = "INSTRUCTLOOP_GATEWAY_URL"

app = typer.Typer(
    help="A scripted labeler for the gateway API (simulate feedback, measure win-rate).", no_args_is_help=True
)

_RUN_DIR_HELP = (
    "Read the gateway URL and the API key from the stack.json and key file `instructloop up` wrote here."
)


def _connection(
    gateway_url: str | None, api_key: str | None, run_dir: Path | None, role: str
) -> tuple[str, str]:
    """Gateway URL and key from the options, else the environment, else ``<run_dir>/stack.json``."""
    gateway_url = gateway_url or os.environ.get(GATEWAY_URL_ENV)
    api_key = api_key or os.environ.get(API_KEY_ENV)
    if (gateway_url is None or api_key is None) and run_dir is not None:
        try:
            stack = StackFile.read(run_dir)
        except FileNotFoundError:
            raise typer.BadParameter(
                f"{StackFile.path(run_dir)} not found: "
                f"start the stack with `instructloop up --run-dir {run_dir}`"
            ) from None
        gateway_url = gateway_url or stack.gateway_url
        if api_key is None:
            keys = json.loads(Path(stack.keys_file).read_text())
            api_key = keys[role]
    if not gateway_url:
        raise typer.BadParameter(f"no gateway URL: pass --gateway-url, set {GATEWAY_URL_ENV}, or --run-dir")
    if not api_key:
        raise typer.BadParameter(
            f"no API key: pass --api-key, set {API_KEY_ENV}, or --run-dir (a {role} key)"
        )
    return gateway_url, api_key


def _preference_option(spec: str) -> PreferenceFunction:
    try:
        return load_preference(spec)
    except PreferenceError as exc:
        raise typer.BadParameter(str(exc), param_hint="--preference") from exc


@app.command("simulate")
def simulate_command(
    preference: str = typer.Option("shorter", help="shorter | without:WORD | with:WORD | module:function"),
    prompts: Path = typer.Option(DEFAULT_PROMPTS, help="Prompt file, one prompt per line."),
    rounds: int = typer.Option(5, min=1, help="Passes over the prompt file."),
    k: int = typer.Option(4, min=2, help="Completions per prompt (the gateway's n), ranked together."),
    max_tokens: int = typer.Option(32, min=1),
    temperature: float = typer.Option(1.0, min=0.0),
    seed: int | None = typer.Option(None, help="Base sampling seed (one per request) for repeatable runs."),
    concurrency: int = typer.Option(4, min=1, help="Prompts in flight at once (like that many labelers)."),
    stop_on_new_version: bool = typer.Option(False, help="Stop once a newly promoted version answers."),
    gateway_url: str | None = typer.Option(None, help=f"Gateway base URL (or {GATEWAY_URL_ENV})."),
    api_key: str | None = typer.Option(None, help=f"A labeler API key (or {API_KEY_ENV})."),
    run_dir: Path | None = typer.Option(Path("run"), help=_RUN_DIR_HELP),
    model: str = typer.Option(
        DEFAULT_MODEL_NAME, help="The `model` field sent with each completion request."
    ),
    chat: bool = typer.Option(False, help="Ask /v1/chat/completions (the prompt as one user message)."),
    flip: float = typer.Option(
        0.0,
        min=0.0,
        max=1.0,
        help="A noisy labeler: flip each (winner, loser) pair of a ranking with this probability, then rank "
        "the K answers by their wins in the flipped pairs (equal wins tied); seeded by --seed. The summary "
        "reports the share of posted pairs that disagree with the preference.",
    ),
) -> None:
    """Ask for K completions per prompt, rank them with the preference, post the rankings as feedback."""
    preference_fn = _preference_option(preference)
    prompt_list = read_prompts(prompts)
    url, key = _connection(gateway_url, api_key, run_dir, role="labeler")
    typer.echo(
        f"labeling {len(prompt_list)} prompts x {rounds} rounds (k={k}) on {url} with preference {preference}"
        + (f", each pair flipped with probability {flip}" if flip else "")
    )
    with GatewayClient(url, key, model=model, chat=chat) as client:
        try:
            summary = simulate(
                client,
                prompt_list,
                preference_fn,
                rounds=rounds,
                k=k,
                max_tokens=max_tokens,
                temperature=temperature,
                seed=seed,
                concurrency=concurrency,
                stop_on_new_version=stop_on_new_version,
                progress=typer.echo,
                flip=flip,
            )
        except LabelerError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc
    typer.echo(json.dumps(summary.as_dict(), indent=2))


@app.command("record")
def record_command(
    out: Path = typer.Option(..., help="Where to write the responses (JSON)."),
    prompts: Path = typer.Option(DEFAULT_HELDOUT_PROMPTS, help="Held-out prompt file, one prompt per line."),
    n: int = typer.Option(8, min=1, help="Responses per prompt (asked 8 per request: any n works)."),
    max_tokens: int = typer.Option(32, min=1),
    temperature: float = typer.Option(1.0, min=0.0),
    seed: int | None = typer.Option(None),
    gateway_url: str | None = typer.Option(None),
    api_key: str | None = typer.Option(None),
    run_dir: Path | None = typer.Option(Path("run"), help=_RUN_DIR_HELP),
    model: str = typer.Option(DEFAULT_MODEL_NAME),
    chat: bool = typer.Option(False, help="Ask /v1/chat/completions (the prompt as one user message)."),
) -> None:
    """Record the served version's responses on held-out prompts (the baseline of `winrate`)."""
    prompt_list = read_prompts(prompts)
    url, key = _connection(gateway_url, api_key, run_dir, role="user")
    with GatewayClient(url, key, model=model, chat=chat) as client:
        recorded = record(client, prompt_list, n=n, max_tokens=max_tokens, temperature=temperature, seed=seed)
    recorded["sampling"]["chat"] = chat
    out.write_text(json.dumps(recorded, indent=2))
    typer.echo(
        f"recorded {n} responses x {len(prompt_list)} prompts of {recorded['policy_versions']} to {out}"
    )


@app.command("winrate")
def winrate_command(
    baseline: Path = typer.Option(..., help="A file written by `instructloop labeler record`."),
    preference: str = typer.Option("shorter", help="shorter | without:WORD | with:WORD | module:function"),
    n: int = typer.Option(8, min=1, help="New responses per prompt."),
    seed: int | None = typer.Option(None),
    gateway_url: str | None = typer.Option(None),
    api_key: str | None = typer.Option(None),
    run_dir: Path | None = typer.Option(Path("run"), help=_RUN_DIR_HELP),
    model: str = typer.Option(DEFAULT_MODEL_NAME),
) -> None:
    """Win-rate of the version served now against the recorded baseline, by the preference (ties = half)."""
    preference_fn = _preference_option(preference)
    if not baseline.exists():
        raise typer.BadParameter(
            f"{baseline} does not exist: write it first with `instructloop labeler record`"
        )
    recorded = json.loads(baseline.read_text())
    sampling = recorded.get("sampling", {})
    url, key = _connection(gateway_url, api_key, run_dir, role="user")
    with GatewayClient(url, key, model=model, chat=sampling.get("chat", False)) as client:  # as recorded
        current = record(
            client,
            list(recorded["responses"]),
            n=n,
            max_tokens=sampling.get("max_tokens", 32),
            temperature=sampling.get("temperature", 1.0),
            seed=seed,
        )
    result = win_rate(current["responses"], recorded["responses"], preference_fn)
    typer.echo(
        json.dumps(
            {
                "new_versions": current["policy_versions"],
                "baseline_versions": recorded.get("policy_versions"),
                **result.as_dict(),
            },
            indent=2,
        )
    )
