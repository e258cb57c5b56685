"""Wire models of the labeling task API (``/v1/label/...``) that the page in ``gateway/web/`` speaks.

The page only ever sees display *slots* (0..K-1 in the order it shows them); the task on the server maps
slots to (completion, choice), so compare mode stays blind: the page never learns which version wrote
which side.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from instructloop.events import Message, OutputFlag

Mode = Literal["rank", "compare", "demonstration"]
Rationale = Annotated[str, Field(max_length=4000)]
GUIDELINES_MAX_CHARS = 20_000


class LabelerCounts(BaseModel):
    """What this labeler submitted (the page shows it as their progress)."""

    rankings: int = 0
    comparisons: int = 0
    demonstrations: int = 0
    skips: int = 0


class Whoami(BaseModel):
    key_id: str
    name: str
    role: str
    k: int = Field(description="responses per ranking task")
    flags: list[str] = Field(description="the per-output flags a labeler can set")
    guidelines: str = Field("", description="the admin's labeling guidelines (plain text; empty: none)")
    counts: LabelerCounts = Field(default_factory=LabelerCounts)
    excluded: bool = Field(False, description="an admin excluded this key: its feedback is refused")


class TaskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Mode = "rank"


class TaskResponseItem(BaseModel):
    slot: int
    text: str


class Task(BaseModel):
    task_id: str
    mode: Mode
    prompt: str = Field(
        description="the model input the responses continue (for chat: the rendered template)"
    )
    messages: list[Message] | None = Field(
        default=None, description="chat prompts: the messages (role, content) the prompt was rendered from"
    )
    responses: list[TaskResponseItem] = Field(
        default_factory=list, description="in display order (slot order)"
    )
    source: Literal["live", "uploaded"]
    overlap: bool = Field(default=False, description="another labeler ranks the same responses (agreement)")


class RankSubmission(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ranking: Annotated[
        list[Annotated[list[int], Field(min_length=1, max_length=9)]], Field(min_length=1, max_length=9)
    ]
    rationale: Rationale | None = None
    flags: dict[int, Annotated[list[OutputFlag], Field(max_length=3)]] = Field(default_factory=dict)


class CompareSubmission(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preferred: Literal["left", "right", "tie"]
    rationale: Rationale | None = None


class DemonstrationSubmission(BaseModel):
    model_config = ConfigDict(extra="forbid")

    response: str = Field(min_length=1)

    @model_validator(mode="after")
    def _not_blank(self) -> DemonstrationSubmission:
        if not self.response.strip():
            raise ValueError("the demonstration must contain non-whitespace text")
        return self


class Submitted(BaseModel):
    id: str = Field(description="event_id of the event written to its stream")
    duplicate: bool = False
    agreement: float | None = Field(
        default=None, description="agreement with the other labeler on an overlap task"
    )


class LabelingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    live_prompts: bool = Field(
        description="use prompts from live traffic (off: only the uploaded prompt set)"
    )
    compare_versions: list[str] | None = Field(
        default=None,
        min_length=2,
        max_length=2,
        description=(
            "the two versions compare mode shows; null = the current version and the newest candidate"
        ),
    )


class PromptUpload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, max_length=10_000)


class PromptsUploaded(BaseModel):
    added: int
    total: int


class Guidelines(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(max_length=GUIDELINES_MAX_CHARS, description="plain text; empty removes the guidelines")


class ExclusionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, Field(max_length=500)] | None = None


class Exclusion(BaseModel):
    key_id: str
    excluded: bool
    name: str = ""
    by: str | None = None
    at: float | None = None
    reason: str | None = None


class LabelerStats(BaseModel):
    key_id: str
    name: str
    excluded: bool = Field(False, description="excluded by an admin: refused, and left out of RM training")
    rankings: int = 0
    comparisons: int = 0
    demonstrations: int = 0
    skips: int = 0
    flagged: int = 0
    overlaps: int = 0
    agreement: float | None = Field(
        default=None, description="share of response pairs ordered like the other labeler"
    )
    agreement_pairs: int = 0


class PolicyPoint(BaseModel):
    time: float
    version: str
    status: str
    reason: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)


class VolumeBucket(BaseModel):
    start: float
    comparisons: int = 0
    demonstrations: int = 0


class LiveWinRate(BaseModel):
    version: str
    against: str
    wins: int
    losses: int
    ties: int
    win_rate: float | None


class Dashboard(BaseModel):
    config: LabelingConfig
    guidelines: str = ""
    current: str | None
    policies: list[PolicyPoint]
    labelers: list[LabelerStats]
    volume: list[VolumeBucket]
    live_win_rates: list[LiveWinRate]
    uploaded_prompts: int
