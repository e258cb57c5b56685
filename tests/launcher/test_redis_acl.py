"""Redis ACL users against a real redis-server: each component's real code path works as its own user,
and nothing else does (no FLUSHALL / CONFIG for any app user, no stream reads for the gateway, read-only
serve)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import redis as redis_lib

from gateway.metrics import GatewayMetrics
from gateway.store import Store, StoredChoice, StoredCompletion
from instructloop.streams import Stream, policy_channel, stream_key
from launcher.credentials import USERS, acl_file_text, acl_template_text, ensure_passwords, user_url
from learner.dataset import Dataset
from learner.ingest import Ingestor
from tests.conftest import free_port
from tests.learner.helpers import comparison, completion

PREFIX = "instructloop"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def acl_redis(tmp_path):
    """A redis-server loading the ACL file ``up`` writes; yields (port, passwords)."""
    passwords = ensure_passwords(tmp_path / "passwords.json")
    acl = tmp_path / "users.acl"
    acl.write_text(acl_file_text(passwords, PREFIX))
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--aclfile",
            str(acl),
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    admin = redis_lib.Redis(port=port, username="admin", password=passwords["admin"])
    deadline = time.monotonic() + 10
    while True:
        try:
            admin.ping()
            break
        except redis_lib.ConnectionError:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
    yield port, passwords
    proc.terminate()
    proc.wait(timeout=10)


def client(port: int, passwords: dict[str, str], user: str) -> redis_lib.Redis:
    return redis_lib.Redis.from_url(user_url("127.0.0.1", port, user, passwords[user]))


def test_k8s_renders_the_same_rules_as_up():
    assert (REPO / "k8s" / "base" / "config" / "users.acl.template").read_text() == acl_template_text(), (
        "regenerate it: python -m launcher.credentials > k8s/base/config/users.acl.template"
    )


def test_passwords_are_private_and_kept(tmp_path):
    path = tmp_path / "passwords.json"
    first = ensure_passwords(path)
    assert set(first) == set(USERS) and len(set(first.values())) == len(USERS)
    assert path.stat().st_mode & 0o777 == 0o600
    assert ensure_passwords(path) == first
    assert all(pw not in acl_file_text(first) for pw in first.values()), "the ACL file holds hashes only"


@pytest.mark.slow
def test_nobody_gets_in_without_a_password(acl_redis):
    port, _ = acl_redis
    with pytest.raises(redis_lib.AuthenticationError):
        redis_lib.Redis(port=port).get("x")
    with pytest.raises(redis_lib.AuthenticationError):
        redis_lib.Redis(port=port, username="gateway", password="guess").ping()


@pytest.mark.slow
@pytest.mark.parametrize("user", ["gateway", "learner", "serve", "exporter", "probe"])
def test_no_app_user_may_flush_reconfigure_or_escalate(acl_redis, user):
    port, passwords = acl_redis
    conn = client(port, passwords, user)
    for command in (
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("CONFIG", "SET", "maxmemory", "0"),
        ("ACL", "SETUSER", user, "+@all"),
        ("SCRIPT", "FLUSH"),
        ("SHUTDOWN", "NOSAVE"),
        ("KEYS", "*"),
        ("MODULE", "LIST"),
    ):
        with pytest.raises(redis_lib.exceptions.NoPermissionError):
            conn.execute_command(*command)
    if user != "exporter":
        with pytest.raises(redis_lib.exceptions.NoPermissionError):
            conn.execute_command("CONFIG", "GET", "requirepass")


@pytest.mark.slow
async def test_the_gateway_does_its_job_and_cannot_read_or_forge_elsewhere(acl_redis):
    port, passwords = acl_redis
    store = Store(
        user_url("127.0.0.1", port, "gateway", passwords["gateway"]),
        PREFIX,
        GatewayMetrics(),
        completion_ttl_s=60,
        idempotency_ttl_s=60,
    )
    try:
        assert await store.ping()
        stored = StoredCompletion(
            id="cmpl-1",
            caller="k",
            prompts=["p"],
            policy_version="base",
            chat=False,
            choices=[StoredChoice(0, "a", "stop", 0, 1), StoredChoice(1, "b", "stop", 0, 1)],
        )
        assert await store.save_completion(stored, [completion(1)])
        assert (await store.get_completion("cmpl-1")).id == "cmpl-1"
        first, duplicate = await store.append_event(Stream.comparisons, comparison(1))  # no idempotency key
        assert not duplicate
        again = await store.append_event(
            Stream.comparisons, comparison(2), idempotency_key="k1", caller="k", request_fingerprint="fp"
        )
        assert await store.append_event(
            Stream.comparisons, comparison(2), idempotency_key="k1", caller="k", request_fingerprint="fp"
        ) == (again[0], True)
        assert await store.hit_rate_limit("key-1", 10) is None
    finally:
        await store.close()
    gateway = client(port, passwords, "gateway")
    # newest-first reads only (the labeling page, the dashboard): no XRANGE / XREAD, no consumer groups
    with pytest.raises(redis_lib.exceptions.NoPermissionError):
        gateway.xrange(stream_key(Stream.comparisons, PREFIX))
    with pytest.raises(redis_lib.exceptions.NoPermissionError):
        gateway.xread({stream_key(Stream.comparisons, PREFIX): "0"})
    with pytest.raises(redis_lib.exceptions.NoPermissionError):
        gateway.xrevrange(stream_key(Stream.dead_letter, PREFIX))
    with pytest.raises(redis_lib.exceptions.NoPermissionError):  # no keys outside its own
        gateway.set("other:key", "x")
    with pytest.raises(redis_lib.exceptions.NoPermissionError):
        gateway.xgroup_create(stream_key(Stream.comparisons, PREFIX), "forged", id="0")
    admin = client(port, passwords, "admin")
    assert admin.xlen(stream_key(Stream.comparisons, PREFIX)) == 2
    assert admin.xlen(stream_key(Stream.completions, PREFIX)) == 1


@pytest.mark.slow
def test_the_learner_consumes_and_serve_only_reads_the_pointer(acl_redis, tmp_path):
    port, passwords = acl_redis
    admin = client(port, passwords, "admin")
    for i in range(3):
        admin.xadd(stream_key(Stream.comparisons, PREFIX), {"event": comparison(i).model_dump_json()})
    admin.xadd(stream_key(Stream.comparisons, PREFIX), {"event": "not json"})  # goes to the dead letters
    learner = client(port, passwords, "learner")
    ingestor = Ingestor(
        learner,
        Dataset(tmp_path / "d.sqlite3", heldout_fraction=0.0),
        prefix=PREFIX,
        group="learner",
        consumer="c1",
        block_ms=50,
    )
    ingestor.ensure_groups()
    ingestor.recover()
    stats = ingestor.drain()
    assert (stats.inserted, stats.dead_lettered) == (3, 1)
    ingestor.update_lag()
    # publishing a version: the pointer, the channel, the policies stream
    learner.set(f"{PREFIX}:policy:current", "v0001")
    learner.publish(policy_channel(PREFIX), "v0001")
    learner.xadd(stream_key(Stream.policies, PREFIX), {"event": "{}"})
    with pytest.raises(redis_lib.exceptions.NoPermissionError):
        learner.set(f"{PREFIX}:gateway:completion:x", "forged")

    serve = client(port, passwords, "serve")
    assert serve.get(f"{PREFIX}:policy:current") == b"v0001"
    pubsub = serve.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(policy_channel(PREFIX))
    for forbidden in (
        lambda: serve.set(f"{PREFIX}:policy:current", "rejected-candidate"),
        lambda: serve.xadd(stream_key(Stream.comparisons, PREFIX), {"event": "{}"}),
        lambda: serve.publish(policy_channel(PREFIX), "v9"),
        lambda: serve.get(f"{PREFIX}:gateway:completion:x"),
    ):
        with pytest.raises(redis_lib.exceptions.NoPermissionError):
            forbidden()
    pubsub.close()


@pytest.mark.slow
def test_up_wires_acl_users_maxmemory_and_the_serve_token(tmp_path):
    """``instructloop up``'s stack: redis-server with the ACL file and maxmemory, each component its own user,
    serve's token given to the gateway, and no password in what up shows or writes to stack.json."""
    from launcher.stack import StackConfig, build_specs

    config = StackConfig(run_dir=tmp_path / "run", redis_port=free_port(), redis_maxmemory="64mb")
    specs, urls = build_specs(config)
    by_name = {spec.name: spec for spec in specs}
    redis_dir = tmp_path / "run" / "redis"
    for private in (redis_dir / "users.acl", redis_dir / "passwords.json", tmp_path / "run" / "serve-token"):
        assert private.stat().st_mode & 0o777 == 0o600, private
    argv = by_name["redis"].argv
    assert argv[argv.index("--aclfile") + 1] == str(redis_dir / "users.acl")
    assert argv[argv.index("--maxmemory") + 1] == "64mb"
    assert argv[argv.index("--maxmemory-policy") + 1] == "noeviction"
    passwords = ensure_passwords(redis_dir / "passwords.json")
    assert not any(pw in urls["redis"] or pw in (by_name["redis"].url or "") for pw in passwords.values())
    env = {name: spec.env for name, spec in by_name.items()}
    for component in ("gateway", "learner", "serve"):
        url = env[component][f"INSTRUCTLOOP_{component.upper()}_REDIS_URL"]
        assert url.startswith(f"redis://{component}:{passwords[component]}@127.0.0.1:")
    assert (
        env["serve"]["INSTRUCTLOOP_SERVE_AUTH_TOKEN"] == env["gateway"]["INSTRUCTLOOP_GATEWAY_BACKEND_TOKEN"]
    )
    assert len(env["serve"]["INSTRUCTLOOP_SERVE_AUTH_TOKEN"]) >= 32
    assert "INSTRUCTLOOP_SERVE_AUTH_TOKEN" not in env["learner"]
    # the redis-server argv up builds really starts, and really enforces it
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not by_name["redis"].health():
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        gateway = redis_lib.Redis.from_url(env["gateway"]["INSTRUCTLOOP_GATEWAY_REDIS_URL"])
        assert gateway.xadd(stream_key(Stream.comparisons, PREFIX), {"event": "{}"})
        with pytest.raises(redis_lib.exceptions.NoPermissionError):
            gateway.flushall()
        with pytest.raises(redis_lib.AuthenticationError):
            redis_lib.Redis.from_url(urls["redis"]).get("x")
        admin = client(config.redis_port, passwords, "admin")
        assert admin.config_get("maxmemory")["maxmemory"] == str(64 * 1024 * 1024)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
async def test_a_restart_replays_the_gateways_transactions_and_scripts_from_the_aof(tmp_path):
    """Redis replays the AOF as ``default`` and re-checks each MULTI/EXEC against its rules (redis#14541):
    with ``default`` at ``-@all`` a restart silently dropped every served completion (MULTI) and feedback
    event (the Lua script's effects), though ``default`` stays off for every connection."""
    from tests.conftest import RedisServer

    server = RedisServer(tmp_path, appendonly=True)
    server.start()
    store = Store(
        server.url_for("gateway"), PREFIX, GatewayMetrics(), completion_ttl_s=60, idempotency_ttl_s=60
    )
    try:
        stored = StoredCompletion("cmpl-1", "k", ["p"], [StoredChoice(0, "a", "stop", 0, 1)], "base", False)
        assert await store.save_completion(stored, [completion(1)])
        await store.append_event(Stream.comparisons, comparison(1), idempotency_key="k1", caller="k")
        server.stop()
        server.start()
        admin = server.client()
        assert admin.exists(f"{PREFIX}:gateway:completion:cmpl-1")
        assert admin.xlen(stream_key(Stream.completions, PREFIX)) == 1
        assert admin.xlen(stream_key(Stream.comparisons, PREFIX)) == 1
        with pytest.raises(redis_lib.AuthenticationError):
            redis_lib.Redis(port=server.port).get("x")
        with pytest.raises(redis_lib.AuthenticationError):
            redis_lib.Redis(port=server.port, username="default", password="").ping()
    finally:
        await store.close()
        server.stop()
