"""The labeling page's server side: a task queue over stored prompts and completions, labeler quality, and
the admin dashboard's data (``docs/architecture.md``, "Labeling page"). ``install`` wires it into an app."""

from __future__ import annotations

from typing import Any


def install(app: Any, state: Any) -> None:
    """Build the labeling serving over the gateway's state and mount the pages and the task API."""
    from prometheus_client import Counter

    from gateway.labeling.admin import LabelingAdminServing
    from gateway.labeling.protocol import LabelingConfig
    from gateway.labeling.serving import LabelingServing
    from gateway.labeling.store import LabelingStore
    from gateway.routes import label

    settings = state.settings
    store = LabelingStore(
        state.store,
        LabelingConfig(live_prompts=settings.label_live_prompts),
        task_ttl_s=settings.completion_ttl_s,
    )
    tasks = Counter(
        "gateway_labeling_tasks_total",
        "Labeling tasks by mode and outcome (created, answered, skipped, refused_<status>)",
        ["mode", "outcome"],
        registry=state.metrics.registry,
    )
    app.state.labeling = LabelingServing(
        settings,
        store,
        state.backend,
        state.store,
        state.tokenizer,
        state.feedback,
        state.demonstrations,
        state.admin.registry,
        tasks_counter=tasks,
    )
    app.state.labeling_admin = LabelingAdminServing(settings, store)
    app.include_router(label.router)
