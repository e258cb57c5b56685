from __future__ import annotations

from fastapi import APIRouter

from gateway.deps import AnyCaller, State
from gateway.protocol import APIError, ModelCard, ModelList
from gateway.routes import ERRORS, error_response

router = APIRouter(tags=["models"])


def _card(state) -> ModelCard:
    versions = {r.policy_version for r in state.backend.healthy() if r.policy_version}
    return ModelCard(
        id=state.settings.served_model_name,
        created=state.started,
        policy_version=versions.pop() if len(versions) == 1 else None,
    )


@router.get("/v1/models", response_model=ModelList, responses=ERRORS)
async def list_models(caller: AnyCaller, state: State) -> ModelList:
    return ModelList(data=[_card(state)])


@router.get("/v1/models/{model}", response_model=ModelCard, responses=ERRORS)
async def retrieve_model(model: str, caller: AnyCaller, state: State):
    if model != state.settings.served_model_name:
        return error_response(
            APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
        )
    return _card(state)
