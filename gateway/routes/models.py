from __future__ import annotations

from fastapi import APIRouter

from gateway.deps import AnyCaller, State
from gateway.protocol import ModelCard, ModelList
from gateway.routes import ERRORS, render

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList, responses=ERRORS)
async def list_models(caller: AnyCaller, state: State):
    """The model ids ``model`` accepts: the current version's alias, ``base``, and each promoted version."""
    return render(await state.models.list_models())


@router.get("/v1/models/{model}", response_model=ModelCard, responses=ERRORS)
async def retrieve_model(model: str, caller: AnyCaller, state: State):
    return render(await state.models.card(model))
