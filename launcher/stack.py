"""``instructloop up``: the whole loop on one machine, in one command.

Starts, as subprocesses of this one and in dependency order,

1. ``redis-server`` (AOF on, data in ``<run-dir>/redis``) unless a Redis URL is given, with one ACL user per
   component (``<run-dir>/redis/users.acl`` and ``passwords.json``, both 0600; the default user is off;
   launcher/credentials.py), ``maxmemory`` (``--redis-maxmemory``, 1gb) and ``noeviction``,
2. one serve replica (``instructloop serve run``) on the chosen model, requiring the bearer token in
   ``<run-dir>/serve-token`` (0600), which only the gateway is given,
3. the learner (``instructloop learner run``; skipped with ``--no-learner``), started beside serve,
4. the gateway (``instructloop gateway run``), once serve is healthy,

waits until each one answers its health check (``/health``, ``/healthz``, ``/readyz``, Redis ``PING``;
polled with httpx, never a fixed sleep), writes ``<run-dir>/api-keys.json`` (mode 0600: a user, a labeler
and an admin key, created with ``instructloop gateway keys create``) and ``<run-dir>/stack.json`` (URLs,
ports, pids, log files), and prints how to call the gateway.

Logs: ``<run-dir>/logs/<component>/<component>.log`` (stdout and stderr of the process, appended).

Failure policy: a component that exits after it was healthy is **restarted** with exponential backoff
(1 s, 2 s, 4 s … up to ``--restart-backoff-max``), as Kubernetes' ``restartPolicy: Always`` would: Redis
resumes from its AOF, the learner from its checkpoint, serve and the gateway are stateless. Its log gets a
``==== restarting`` line, ``up`` prints why, and ``stack.json`` is rewritten with the new pid and restart
count. Only a crash loop (more than ``--max-restarts`` crashes of one component within
``--restart-window`` seconds) is reported (name, exit code, log file, last log lines) and **stops
everything** (``up`` exits 1). A component that fails at start-up, or does not become healthy within
``--startup-timeout``, is reported the same way at once: that is a configuration fault, not a crash.

Stopping: Ctrl-C or SIGTERM stops the components in reverse order (gateway first, Redis last): SIGTERM
to the component's process group, wait ``--stop-timeout`` seconds, then SIGKILL. A second Ctrl-C
skips the wait. Components are also asked by the kernel (``PR_SET_PDEATHSIG``) to stop if ``up``
itself is killed with SIGKILL.

Learner knobs pass through the environment: every ``INSTRUCTLOOP_LEARNER_*`` (and ``*_SERVE_*``,
``*_GATEWAY_*``) variable set when ``up`` starts reaches its component, except the wiring ``up`` owns
(ports, Redis URL, registry and state folders, model, keys file).

CPU threads: serve and the learner are both torch processes, which must not each use every core. Unless
set, serve gets ``INSTRUCTLOOP_SERVE_TORCH_THREADS`` = half the cores and the learner ``OMP_NUM_THREADS`` =
the other half (the gateway: 1).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import typer

from instructloop.logs import redact_url
from instructloop.settings import DEFAULT_MODEL
from instructloop.stackfile import LEARNER_STATE_SUBDIR, ComponentInfo, StackFile
from launcher.credentials import ensure_serve_token, secure_redis
from launcher.supervisor import (
    Component,
    ComponentFailed,
    ComponentSpec,
    RestartPolicy,
    Supervisor,
    describe_exit,
    http_health,
    pick_port,
    port_is_free,
    redis_health,
)

log = logging.getLogger(__name__)

KEY_ROLES = ("user", "labeler", "admin")


# ---- the stack ----------------------------------------------------------------------------------------


@dataclass
class StackConfig:
    run_dir: Path = Path("run")
    model: str = DEFAULT_MODEL
    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    serve_port: int | None = None
    learner_metrics_port: int | None = None
    redis_port: int | None = None
    redis_maxmemory: str = "1gb"
    learner: bool = True
    startup_timeout_s: float = 600.0
    stop_timeout_s: float = 20.0
    restart: RestartPolicy = RestartPolicy()

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def keys_file(self) -> Path:
        """The plain keys for people (0600)."""
        return self.run_dir / "api-keys.json"

    @property
    def gateway_keys_file(self) -> Path:
        """The gateway's hashed keys (``INSTRUCTLOOP_GATEWAY_KEYS_FILE``)."""
        return self.run_dir / "gateway" / "keys.jsonl"

    @property
    def stack_file(self) -> Path:
        return StackFile.path(self.run_dir)

    def log_path(self, component: str) -> Path:
        return self.logs_dir / component / f"{component}.log"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher.cli", *args]


def _child_env(
    project_root: Path, overrides: dict[str, str], defaults: dict[str, str] | None = None
) -> dict[str, str]:
    """This process's environment (knobs pass through), ``defaults`` where unset, then ``up``'s wiring."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(project_root), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    for key, value in (defaults or {}).items():
        env.setdefault(key, value)
    env.update(overrides)
    return env


def project_root() -> Path:
    """The folder holding the rooms' packages (a checkout, or site-packages when installed)."""
    return Path(__file__).resolve().parent.parent


def thread_budget(cpus: int | None = None) -> tuple[int, int]:
    """(serve, learner) torch threads: the cores split between the two, so they never oversubscribe.

    Two torch processes each using every core slow each other down several times over (spinning
    OpenMP workers); serve and the learner each get about half of the cores instead.
    """
    cpus = cpus or os.cpu_count() or 1
    serve = max(1, cpus // 2)
    return serve, max(1, cpus - serve)


def build_specs(config: StackConfig) -> tuple[list[ComponentSpec], dict[str, str]]:
    """The components of the stack and the URLs they will answer on."""
    root = project_root()
    run_dir = config.run_dir.resolve()
    host = config.host
    specs: list[ComponentSpec] = []
    urls: dict[str, str] = {}

    redis_url = config.redis_url
    if redis_url is None:
        if shutil.which("redis-server") is None:
            raise typer.BadParameter(
                "redis-server is not installed: run `make install` "
                "(or `sudo apt-get install -y redis-server`), "
                "or point at a running Redis with --redis-url redis://HOST:PORT/0"
            )
        redis_port = pick_port(config.redis_port)
        redis_dir = run_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        # one ACL user per component (launcher/credentials.py); the default user is off
        secure_args, component_urls = secure_redis(redis_dir, redis_port, config.redis_maxmemory)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"  # shown and written to stack.json: no password
        specs.append(
            ComponentSpec(
                name="redis",
                argv=[
                    "redis-server",
                    "--port",
                    str(redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(redis_dir),
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "everysec",
                    "--save",
                    "",
                    "--daemonize",
                    "no",
                    *secure_args,
                ],
                health=redis_health(component_urls["probe"]),
                log_path=config.log_path("redis").resolve(),
                env=dict(os.environ),
                url=redis_url,
                startup_timeout_s=min(config.startup_timeout_s, 60.0),
            )
        )
    else:
        component_urls = {user: redis_url for user in ("gateway", "learner", "serve")}
        redis_url = redact_url(redis_url)
    urls["redis"] = redis_url
    needs_redis = ["redis"] if config.redis_url is None else []

    shared = {"MODEL": config.model, "REGISTRY_DIR": str(run_dir / "registry")}
    serve_threads, learner_threads = thread_budget()

    serve_token = ensure_serve_token(run_dir / "serve-token")
    serve_port = pick_port(config.serve_port or 8080, host)
    serve_url = f"http://{host}:{serve_port}"
    urls["serve"] = serve_url
    specs.append(
        ComponentSpec(
            name="serve",
            argv=_cli("serve", "run"),
            health=http_health(f"{serve_url}/health"),
            log_path=config.log_path("serve").resolve(),
            env=_child_env(
                root,
                {
                    f"INSTRUCTLOOP_SERVE_{k}": v
                    for k, v in {
                        **shared,
                        "REDIS_URL": component_urls["serve"],
                        "HOST": host,
                        "PORT": str(serve_port),
                        "AUTH_TOKEN": serve_token,
                    }.items()
                },
                defaults={
                    "INSTRUCTLOOP_SERVE_TORCH_THREADS": str(serve_threads),
                    "OMP_NUM_THREADS": str(serve_threads),
                },
            ),
            after=needs_redis,
            url=serve_url,
            startup_timeout_s=config.startup_timeout_s,
        )
    )

    if config.learner:
        metrics_port = pick_port(config.learner_metrics_port or 9100)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        urls["learner"] = metrics_url
        specs.append(
            ComponentSpec(
                name="learner",
                argv=_cli("learner", "run"),
                health=http_health(f"http://127.0.0.1:{metrics_port}/healthz"),  # the main loop's heartbeat
                log_path=config.log_path("learner").resolve(),
                env=_child_env(
                    root,
                    {
                        f"INSTRUCTLOOP_LEARNER_{k}": v
                        for k, v in {
                            **shared,
                            "REDIS_URL": component_urls["learner"],
                            "STATE_DIR": str(run_dir / LEARNER_STATE_SUBDIR),
                            "METRICS_PORT": str(metrics_port),
                            "CONSUMER_NAME": "learner-0",
                        }.items()
                    },
                    defaults={
                        "INSTRUCTLOOP_LEARNER_TORCH_THREADS": str(learner_threads),
                        "OMP_NUM_THREADS": str(learner_threads),
                    },
                ),
                after=needs_redis,
                url=metrics_url,
                startup_timeout_s=config.startup_timeout_s,
            )
        )

    gateway_url = f"http://{host}:{config.port}"
    urls["gateway"] = gateway_url
    specs.append(
        ComponentSpec(
            name="gateway",
            argv=_cli("gateway", "run"),
            health=http_health(f"{gateway_url}/readyz"),
            log_path=config.log_path("gateway").resolve(),
            env=_child_env(
                root,
                {
                    f"INSTRUCTLOOP_GATEWAY_{k}": v
                    for k, v in {
                        **shared,
                        "REDIS_URL": component_urls["gateway"],
                        "HOST": host,
                        "PORT": str(config.port),
                        "BACKENDS": serve_url,
                        "BACKEND_TOKEN": serve_token,
                        "KEYS_FILE": str(config.gateway_keys_file.resolve()),
                        "DEV_MODE": "false",
                    }.items()
                },
                defaults={"OMP_NUM_THREADS": "1"},
            ),
            after=["serve"],
            url=gateway_url,
            startup_timeout_s=config.startup_timeout_s,
        )
    )
    return specs, urls


def ensure_api_keys(config: StackConfig, echo: Callable[[str], None] = print) -> dict[str, str]:
    """One key per role in ``<run-dir>/api-keys.json`` (0600), registered (hashed) in the gateway's keys file.

    Kept across restarts: existing keys are reused while both files exist. Keys are created with the
    gateway's own command, ``instructloop gateway keys create``.
    """
    keys_file, gateway_keys = config.keys_file, config.gateway_keys_file
    if keys_file.exists() and gateway_keys.exists():
        keys = json.loads(keys_file.read_text())
        if all(keys.get(role) for role in KEY_ROLES):
            return keys
    gateway_keys.parent.mkdir(parents=True, exist_ok=True)
    gateway_keys.unlink(missing_ok=True)  # keys the user cannot read any more must not stay valid
    keys: dict[str, str] = {}
    env = _child_env(project_root(), {"INSTRUCTLOOP_GATEWAY_KEYS_FILE": str(gateway_keys.resolve())})
    creating = {  # the three run side by side; each appends one line (O_APPEND) to the keys file
        role: subprocess.Popen(
            _cli(
                "gateway",
                "keys",
                "create",
                "--role",
                role,
                "--name",
                f"up-{role}",
                "--keys-file",
                str(gateway_keys.resolve()),
            ),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for role in KEY_ROLES
    }
    for role, proc in creating.items():
        stdout, stderr = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(
                f"`instructloop gateway keys create --role {role}` failed ({proc.returncode}): "
                f"{(stderr or stdout).strip()[-2000:]}"
            )
        keys[role] = _parse_created_key(stdout)
    fd = os.open(keys_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        json.dump(keys, handle, indent=2)
        handle.write("\n")
    echo(f"created API keys ({', '.join(KEY_ROLES)}) in {keys_file}")
    return keys


def _parse_created_key(stdout: str) -> str:
    """The key printed by ``gateway keys create`` (the only token with the ``il-`` key prefix)."""
    for token in stdout.replace('"', " ").replace("'", " ").split():
        if token.startswith("il-") and len(token) > 20:
            return token
    raise RuntimeError(f"could not find the new key in the output of `gateway keys create`: {stdout[:500]!r}")


def usage_text(gateway_url: str, keys_file: Path) -> str:
    """Copy-paste examples printed once the stack is up."""
    keys = str(keys_file)
    return f"""
instructloop is up.
  gateway:  {gateway_url}   (OpenAI-compatible; /v1/completions, /v1/feedback, /readyz, /metrics)
  API keys: {keys}   (0600; roles user, labeler, admin)
  labeling: {gateway_url}/label   (sign in with the labeler key; admin dashboard: {gateway_url}/label/admin)

A completion with curl (4 choices to rank):
  USER_KEY=$(python3 -c 'import json;print(json.load(open("{keys}"))["user"])')
  curl -s {gateway_url}/v1/completions -H "Authorization: Bearer $USER_KEY" \\
    -H 'Content-Type: application/json' \\
    -d '{{"model": "instructloop", "prompt": "Tell me about cats.", "n": 4, "max_tokens": 32}}'

Rank its choices (best first; [1, 3] are tied) with the labeler key:
  LABELER_KEY=$(python3 -c 'import json;print(json.load(open("{keys}"))["labeler"])')
  curl -s {gateway_url}/v1/feedback -H "Authorization: Bearer $LABELER_KEY" \\
    -H 'Content-Type: application/json' \\
    -d '{{"type": "ranking", "completion_id": "<the id from above>", "ranking": [[2], [1, 3], [0]]}}'

The same with the openai client:
  python3 - <<'EOF'
  import json, httpx, openai
  keys = json.load(open("{keys}"))
  client = openai.OpenAI(base_url="{gateway_url}/v1", api_key=keys["user"])
  completion = client.completions.create(
      model="instructloop", prompt="Tell me about cats.", n=4, max_tokens=32
  )
  print(completion.policy_version, [c.text for c in completion.choices])
  ranking = {{"type": "ranking", "completion_id": completion.id, "ranking": [[2], [1, 3], [0]]}}
  httpx.post(
      "{gateway_url}/v1/feedback", headers={{"Authorization": "Bearer " + keys["labeler"]}}, json=ranking
  ).raise_for_status()
  EOF

Or let the scripted labeler rank for you (prefers answers without the word "the"):
  instructloop labeler simulate --run-dir {keys_file.parent} --preference without:the --rounds 5

Ctrl-C stops everything.
"""


def run_stack(config: StackConfig, echo: Callable[[str], None] = print) -> int:
    """Start the stack, wait for Ctrl-C/SIGTERM or a crash, stop everything. Returns the exit status."""
    config.run_dir.mkdir(parents=True, exist_ok=True)
    config.run_dir = config.run_dir.resolve()
    if config.model != DEFAULT_MODEL and Path(config.model).expanduser().exists():
        config.model = str(Path(config.model).expanduser().resolve())  # children may resolve paths elsewhere
    if not port_is_free(config.port, config.host):
        echo(f"error: port {config.port} on {config.host} is in use: pass --port N (another free port)")
        return 2
    config.stack_file.unlink(missing_ok=True)
    specs, urls = build_specs(config)
    supervisor = Supervisor(
        specs,
        stop_timeout_s=config.stop_timeout_s,
        echo=echo,
        restart=config.restart,
        on_change=lambda: _write_stack_file(config, supervisor, urls),
    )
    supervisor.install_signal_handlers()
    status = 0
    try:
        if config.model == DEFAULT_MODEL:
            _prepare_default_model(config, supervisor, echo)
        keys = ensure_api_keys(config, echo)
        assert set(keys) == set(KEY_ROLES)
        if not supervisor.start_all():
            echo("stop requested during start-up")
            return 0
        _write_stack_file(config, supervisor, urls)
        echo(usage_text(urls["gateway"], config.keys_file))
        failure = supervisor.watch()
        if failure is not None:
            echo(failure.report())
            echo("a component is crash-looping: stopping everything (raise --max-restarts to allow more)")
            status = 1
    except ComponentFailed as failure:
        echo(failure.report())
        status = 1
    except RuntimeError as exc:
        echo(f"error: {exc}")
        status = 1
    finally:
        supervisor.stop_all()
        supervisor.restore_signal_handlers()
        config.stack_file.unlink(missing_ok=True)
    return status


def _prepare_default_model(config: StackConfig, supervisor: Supervisor, echo: Callable[[str], None]) -> None:
    """Convert the embedded model once, before serve and learner both want it (a child process)."""
    from instructloop.model import default_model_dir, is_prepared

    if is_prepared(default_model_dir()):
        return
    echo("preparing the default model once (about 30 s)…")
    spec = ComponentSpec(
        name="model-prepare",
        argv=_cli("model", "prepare"),
        health=lambda: False,
        log_path=config.log_path("model-prepare").resolve(),
        env=_child_env(project_root(), {}),
    )
    component = Component(spec)
    component.start()
    assert component.proc is not None
    while component.proc.poll() is None:
        if supervisor.stop_requested.is_set():
            component.stop(config.stop_timeout_s)
            raise RuntimeError("stop requested while preparing the default model")
        supervisor.wake.wait(1.0)
        supervisor.wake.clear()
    if component.proc.returncode != 0:
        raise ComponentFailed(
            "model-prepare",
            f"exited ({describe_exit(component.proc.returncode)})",
            spec.log_path,
            exit_code=component.proc.returncode,
        )


def _write_stack_file(config: StackConfig, supervisor: Supervisor, urls: dict[str, str]) -> None:
    StackFile(
        gateway_url=urls["gateway"],
        keys_file=str(config.keys_file),
        run_dir=str(config.run_dir),
        up_pid=os.getpid(),
        components={
            c.name: ComponentInfo(
                pid=c.proc.pid if c.proc else None,
                url=c.spec.url,
                log=str(c.spec.log_path),
                restarts=c.restarts,
                healthy=c.healthy,
            )
            for c in supervisor.components
        },
    ).write(config.run_dir)


def up(
    run_dir: Path = typer.Option(
        Path("run"), help="Folder for logs, Redis data, registry, learner state, keys."
    ),
    model: str = typer.Option(
        DEFAULT_MODEL, help="'default' (embedded SmolLM2-135M-Instruct) or an HF model folder."
    ),
    redis_url: str | None = typer.Option(
        None, envvar="INSTRUCTLOOP_REDIS_URL", help="Use this Redis instead of starting redis-server."
    ),
    port: int = typer.Option(8000, min=1, max=65535, help="Gateway port."),
    host: str = typer.Option("127.0.0.1", help="Interface the gateway and serve listen on."),
    serve_port: int | None = typer.Option(None, help="Serve port (default 8080, or a free one if taken)."),
    learner_metrics_port: int | None = typer.Option(
        None, help="Learner /metrics port (default 9100, or a free one)."
    ),
    redis_port: int | None = typer.Option(
        None, help="Port of the redis-server `up` starts (default: a free one)."
    ),
    redis_maxmemory: str = typer.Option(
        "1gb",
        help="maxmemory of the redis-server `up` starts (noeviction: when "
        "full, feedback answers 503 and nothing accepted is lost).",
    ),
    learner: bool = typer.Option(
        True, "--learner/--no-learner", help="Run the learner (off: serve + gateway only)."
    ),
    startup_timeout: float = typer.Option(
        600.0, min=1.0, help="Seconds each component may take to become healthy."
    ),
    stop_timeout: float = typer.Option(
        20.0, min=0.0, help="Seconds between SIGTERM and SIGKILL when stopping."
    ),
    max_restarts: int = typer.Option(
        5,
        min=0,
        help="Crashes of one component tolerated within --restart-window "
        "(each restarted with backoff); one more stops everything.",
    ),
    restart_window: float = typer.Option(
        300.0, min=1.0, help="Seconds over which --max-restarts is counted."
    ),
    restart_backoff_max: float = typer.Option(
        30.0, min=1.0, help="Longest wait before restarting a crashed component."
    ),
) -> None:
    """Start Redis, serve, the learner and the gateway; print how to use them; Ctrl-C stops all.

    Learner knobs pass through the environment (INSTRUCTLOOP_LEARNER_KL_COEF, ..._PTX_COEF,
    ..._MIN_NEW_COMPARISONS, ...). A component that dies is restarted with backoff; only a crash loop
    (more than --max-restarts crashes within --restart-window) stops everything.
    """
    config = StackConfig(
        run_dir=run_dir,
        model=model,
        redis_url=redis_url,
        host=host,
        port=port,
        serve_port=serve_port,
        learner_metrics_port=learner_metrics_port,
        redis_port=redis_port,
        redis_maxmemory=redis_maxmemory,
        learner=learner,
        startup_timeout_s=startup_timeout,
        stop_timeout_s=stop_timeout,
        restart=RestartPolicy(
            backoff_max_s=restart_backoff_max, max_restarts=max_restarts, window_s=restart_window
        ),
    )
    status = run_stack(config, echo=lambda message: typer.echo(message, err=message.startswith("error")))
    raise typer.Exit(status)
