"""Alerts, the Grafana dashboard and the KEDA query: well-formed, and naming only metrics that exist.

A metric name misspelt in an alert never fires and a dashboard panel stays empty, silently. So every
metric an expression names must be exported by this repository's code (the names are read from the
gateway's, serve's and learner's real prometheus_client registries, with the suffixes the client adds:
``_total`` for counters, ``_bucket``/``_sum``/``_count`` for histograms) or be one of the few outside
names listed below with where they come from.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.deploy.conftest import K8S

# Metrics not exported by this repository's code, with their source.
EXTERNAL_METRICS = {
    "up": "Prometheus itself, per scrape target",
    "redis_memory_used_bytes": "redis_exporter (the Redis pod's exporter container), INFO memory",
    "redis_memory_max_bytes": "redis_exporter, CONFIG maxmemory",
}
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "inf", "nan",
}  # fmt: skip


def exported_metric_names() -> set[str]:
    """Every sample name the gateway, serve and learner can export, from their real registries."""
    from gateway import labeling
    from gateway.metrics import GatewayMetrics
    from learner.metrics import LearnerMetrics
    from serve.metrics import ServeMetrics

    registries = [GatewayMetrics().registry, ServeMetrics().registry, LearnerMetrics().registry]
    assert hasattr(labeling, "install")  # its Counter joins the gateway's registry: listed by name below
    names: set[str] = set()
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count"),
        "gauge": ("",),
    }
    for registry in registries:
        for family in registry.collect():
            names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    names.add("gateway_labeling_tasks_total")
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (strings, label matchers, ranges, groupings removed)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    found = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        following = text[match.end() :].lstrip()[:1]
        if following == "(" or word.lower() in PROMQL_WORDS:
            continue  # a function or a keyword
        if match.start() > 0 and (text[match.start() - 1].isdigit() or text[match.start() - 1] == "."):
            continue  # a number's exponent or suffix
        found.add(word)
    return found


def test_the_expression_reader_finds_metrics_and_skips_the_rest():
    expr = 'sum by (le, route) (rate(gateway_request_seconds_bucket{status=~"5..", x="a{b}"}[5m])) / 1e3'
    assert metric_names(expr) == {"gateway_request_seconds_bucket"}
    assert metric_names("time() - max(learner_heartbeat_timestamp_seconds) > 900") == {
        "learner_heartbeat_timestamp_seconds"
    }
    assert metric_names("a_total / on(pod) group_left b_total and absent(c)") == {"a_total", "b_total", "c"}


def _rule_exprs(docs: list[dict]) -> dict[str, str]:
    return {
        rule["alert"]: rule["expr"]
        for rule_set in [d for d in docs if d["kind"] == "PrometheusRule"]
        for group in rule_set["spec"]["groups"]
        for rule in group["rules"]
    }


def _dashboard(docs: list[dict]) -> dict:
    (config_map,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard")
    ]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    ((_, text),) = config_map["data"].items()
    return json.loads(text)


@pytest.mark.parametrize("name", ["base", "local", "gpu"])
def test_alerts_cover_the_failure_modes_and_are_complete(rendered, name):
    docs = rendered[name]
    (rules,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rules["apiVersion"] == "monitoring.coreos.com/v1"
    assert rules["metadata"]["labels"]["release"] == "prometheus"  # kube-prometheus-stack's ruleSelector
    exprs = _rule_exprs(docs)
    for alert in (
        "InstructloopRedisMemoryNearFull",
        "InstructloopRedisFull",
        "InstructloopLearnerStalled",
        "InstructloopConsumerLag",
        "InstructloopGateway5xxRate",
        "InstructloopServeDown",
    ):
        assert alert in exprs, f"no alert {alert}"
    for group in rules["spec"]["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
            assert 'namespace="instructloop"' in rule["expr"], rule["alert"]


@pytest.mark.parametrize("name", ["base", "gpu"])
def test_alerts_dashboard_and_scaler_name_only_metrics_that_exist(rendered, name):
    docs = rendered[name]
    known = exported_metric_names() | set(EXTERNAL_METRICS)
    named: dict[str, set[str]] = {}
    for alert, expr in _rule_exprs(docs).items():
        named[f"alert {alert}"] = metric_names(expr)
    for panel in _dashboard(docs)["panels"]:
        for target in panel.get("targets", []):
            named.setdefault(f"panel {panel['title']!r}", set()).update(metric_names(target["expr"]))
    for scaled in [d for d in docs if d["kind"] == "ScaledObject"]:
        for trigger in scaled["spec"]["triggers"]:
            if trigger["type"] == "prometheus":
                named[f"ScaledObject {scaled['metadata']['name']}"] = metric_names(
                    trigger["metadata"]["query"]
                )
    assert all(named.values()), {k: v for k, v in named.items() if not v}
    unknown = {where: sorted(names - known) for where, names in named.items() if names - known}
    assert not unknown, f"metrics no code exports (misspelt?): {unknown}"
    # the dashboard shows each deployable and the per-replica view
    all_named = set().union(*named.values())
    for metric in (
        "gateway_backend_healthy",
        "tgi_queue_size",
        "learner_consumer_lag",
        "redis_memory_used_bytes",
    ):
        assert metric in all_named, metric


def test_the_dashboard_is_a_grafana_dashboard(rendered):
    dashboard = _dashboard(rendered["base"])
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    (variable,) = dashboard["templating"]["list"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}"
            assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    # the file in the repo is the one shipped
    shipped = json.loads((K8S / "base" / "monitoring" / "instructloop-dashboard.json").read_text())
    assert shipped == dashboard
