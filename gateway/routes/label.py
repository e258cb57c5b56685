"""The labeling pages (``/label``, ``/label/admin``, their assets) and the task API they speak.

Pages and assets ship in the package (``gateway/web/``): no build step, nothing fetched from elsewhere.
They are sent with a strict Content-Security-Policy (scripts and styles from this origin only, no inline
script), on top of the pages themselves rendering model text only as text.
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Path, Request
from fastapi.responses import Response

from gateway.deps import Admin, IdempotencyKey, Labeler
from gateway.labeling.admin import LabelingAdminServing
from gateway.labeling.dashboard import build_dashboard
from gateway.labeling.protocol import (
    CompareSubmission,
    Dashboard,
    DemonstrationSubmission,
    Exclusion,
    ExclusionRequest,
    Guidelines,
    LabelingConfig,
    PromptsUploaded,
    PromptUpload,
    RankSubmission,
    Submitted,
    Task,
    TaskRequest,
    Whoami,
)
from gateway.labeling.serving import LabelingServing
from gateway.protocol import APIError, FeedbackAccepted
from gateway.routes import ERRORS, render

router = APIRouter(tags=["labeling"])

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
ASSETS = {
    "label.js": "text/javascript",
    "admin.js": "text/javascript",
    "common.js": "text/javascript",
    "charts.js": "text/javascript",
    "label.css": "text/css",
}
PAGES = {"label": "label.html", "admin": "admin.html"}


async def _labeling(request: Request) -> LabelingServing:
    return request.app.state.labeling


Labeling = Annotated[LabelingServing, Depends(_labeling)]


async def _labeling_admin(request: Request) -> LabelingAdminServing:
    return request.app.state.labeling_admin


LabelingAdmin = Annotated[LabelingAdminServing, Depends(_labeling_admin)]


def _web_file(name: str) -> bytes:
    return resources.files("gateway").joinpath("web", name).read_bytes()


def _page_headers(cache: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": cache,
    }


@router.get("/label", include_in_schema=False)
async def label_page() -> Response:
    """The labeling page: rank, compare, write demonstrations (signs in with a labeler key)."""
    return Response(
        _web_file(PAGES["label"]), media_type="text/html; charset=utf-8", headers=_page_headers("no-store")
    )


@router.get("/label/admin", include_in_schema=False)
async def admin_page() -> Response:
    """The admin dashboard (signs in with an admin key)."""
    return Response(
        _web_file(PAGES["admin"]), media_type="text/html; charset=utf-8", headers=_page_headers("no-store")
    )


@router.get("/label/assets/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    if name not in ASSETS:
        return render(APIError(404, f"no asset {name!r}", code="not_found"))
    return Response(_web_file(name), media_type=ASSETS[name], headers=_page_headers("no-cache"))


# ---- the task API (labeler) ---------------------------------------------------------------------------


@router.get("/v1/label/me", response_model=Whoami, responses=ERRORS)
async def whoami(labeler: Labeler, serving: Labeling):
    """Who this key is (the page checks it at sign-in), the task settings, the admin's guidelines, this
    labeler's own counts and whether an admin excluded them."""
    return render(await serving.whoami(labeler))


@router.post("/v1/label/tasks", response_model=Task, responses=ERRORS)
async def next_task(labeler: Labeler, serving: Labeling, body: Annotated[TaskRequest | None, Body()] = None):
    """The next task in ``mode`` (rank, compare, demonstration) for this labeler."""
    return render(await serving.next_task((body or TaskRequest()).mode, labeler))


@router.post("/v1/label/tasks/{task_id}/ranking", status_code=202, response_model=Submitted, responses=ERRORS)
async def submit_ranking(
    task_id: str,
    body: RankSubmission,
    labeler: Labeler,
    serving: Labeling,
    idempotency_key: IdempotencyKey = None,
):
    """The ranking of a rank task, in display slots (best first, ties grouped), flags and rationale."""
    return render(await serving.submit_rank(task_id, body, labeler, idempotency_key), status_code=202)


@router.post(
    "/v1/label/tasks/{task_id}/comparison", status_code=202, response_model=Submitted, responses=ERRORS
)
async def submit_comparison(
    task_id: str,
    body: CompareSubmission,
    labeler: Labeler,
    serving: Labeling,
    idempotency_key: IdempotencyKey = None,
):
    """The vote of a compare task: left, right or tie (an A/B comparison between two versions)."""
    return render(await serving.submit_compare(task_id, body, labeler, idempotency_key), status_code=202)


@router.post(
    "/v1/label/tasks/{task_id}/demonstration", status_code=202, response_model=Submitted, responses=ERRORS
)
async def submit_demonstration(
    task_id: str,
    body: DemonstrationSubmission,
    labeler: Labeler,
    serving: Labeling,
    idempotency_key: IdempotencyKey = None,
):
    """The ideal answer written for a demonstration task's prompt."""
    return render(
        await serving.submit_demonstration(task_id, body, labeler, idempotency_key), status_code=202
    )


@router.post("/v1/label/tasks/{task_id}/skip", response_model=FeedbackAccepted, responses=ERRORS)
async def skip_task(task_id: str, labeler: Labeler, serving: Labeling):
    """Drop the task without an answer (its prompt is not shown to this labeler again)."""
    return render(await serving.skip(task_id, labeler))


# ---- admin --------------------------------------------------------------------------------------------


@router.get("/v1/admin/labeling", response_model=Dashboard, responses=ERRORS)
async def dashboard(admin: Admin, serving: Labeling):
    """Versions over time with gate metrics, live win-rates, feedback volume, labelers and their agreement."""
    from gateway.store import StoreUnavailable

    try:
        return render(await build_dashboard(serving.store, serving.registry, time.time()))
    except StoreUnavailable as exc:
        return render(serving._unavailable(exc))


@router.get("/v1/admin/labeling/config", response_model=LabelingConfig, responses=ERRORS)
async def get_config(admin: Admin, serving: LabelingAdmin):
    return render(await serving.config())


@router.put("/v1/admin/labeling/config", response_model=LabelingConfig, responses=ERRORS)
async def put_config(body: LabelingConfig, admin: Admin, serving: LabelingAdmin):
    """Turn live-traffic prompts on or off (privacy); name the two versions compare mode shows."""
    return render(await serving.set_config(body, admin))


@router.get("/v1/admin/labeling/guidelines", response_model=Guidelines, responses=ERRORS)
async def get_guidelines(admin: Admin, serving: LabelingAdmin):
    return render(await serving.guidelines())


@router.put("/v1/admin/labeling/guidelines", response_model=Guidelines, responses=ERRORS)
async def put_guidelines(body: Guidelines, admin: Admin, serving: LabelingAdmin):
    """The guidelines text labelers see on /label (plain text; empty removes it)."""
    return render(await serving.set_guidelines(body, admin))


@router.put("/v1/admin/labeling/labelers/{key_id}/exclusion", response_model=Exclusion, responses=ERRORS)
async def exclude_labeler(
    key_id: Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")],
    admin: Admin,
    serving: LabelingAdmin,
    body: Annotated[ExclusionRequest | None, Body()] = None,
):
    """Exclude a labeler: their feedback is refused from now on, and the learner leaves all their
    comparisons (past and future) out of its next reward-model updates."""
    return render(await serving.exclude(key_id, body or ExclusionRequest(), admin))


@router.delete("/v1/admin/labeling/labelers/{key_id}/exclusion", response_model=Exclusion, responses=ERRORS)
async def include_labeler(key_id: str, admin: Admin, serving: LabelingAdmin):
    """Take a labeler off the excluded list (their stored comparisons train later RM updates again)."""
    return render(await serving.include(key_id, admin))


@router.post("/v1/admin/labeling/prompts", response_model=PromptsUploaded, responses=ERRORS)
async def upload_prompts(body: PromptUpload, admin: Admin, serving: LabelingAdmin):
    """Add prompts to the uploaded prompt set (duplicates are ignored)."""
    return render(await serving.upload_prompts(body, admin))
