"""HTTP routes. Thin: parse -> GenerationRequest -> runner.submit -> JSON body or SSE stream."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from tokenmill.errors import ModelNotFound
from tokenmill.generation import GenerationRequest
from tokenmill.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
    new_id,
    now,
)
from tokenmill.runners import Runner
from tokenmill.sampling import SamplingParams
from tokenmill.server import streams
from tokenmill.server.sse import EventStreamResponse

router = APIRouter()

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 404, 500, 503, 504)}


def _runner(request: Request) -> Runner:
    return request.app.state.runner


def _check_model(runner: Runner, model: str | None) -> str:
    if model is not None and model != runner.model_name:
        raise ModelNotFound(
            f"The model '{model}' does not exist; this server serves '{runner.model_name}'.", param="model"
        )
    return runner.model_name


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=_ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    runner = _runner(request)
    model = _check_model(runner, body.model)
    completion_id, created = new_id("chatcmpl"), now()
    generation = GenerationRequest(
        request_id=completion_id, params=body.to_sampling_params(), messages=body.chat_messages()
    )
    handle = await runner.submit(generation)
    if body.stream:
        return EventStreamResponse(streams.chat_stream(handle, completion_id, created, model, body.include_usage))
    return await streams.chat_completion(handle, completion_id, created, model)


@router.post("/v1/completions", response_model=Completion, responses=_ERRORS)
async def completions(body: CompletionRequest, request: Request):
    runner = _runner(request)
    model = _check_model(runner, body.model)
    completion_id, created = new_id("cmpl"), now()
    generation = GenerationRequest(
        request_id=completion_id, params=body.to_sampling_params(), prompt=body.prompt_text()
    )
    handle = await runner.submit(generation)
    if body.stream:
        return EventStreamResponse(
            streams.completion_stream(handle, completion_id, created, model, body.include_usage)
        )
    return await streams.text_completion(handle, completion_id, created, model)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    runner = _runner(request)
    return ModelList(data=[ModelCard(id=runner.model_name, created=request.app.state.started_at)])


@router.post("/generate", response_model=GenerateResponse, responses=_ERRORS)
async def generate(body: GenerateRequest, request: Request) -> GenerateResponse:
    generation = GenerationRequest(request_id=new_id("gen"), params=body.to_sampling_params(), prompt=body.prompt)
    text, finished = await streams.collect(await _runner(request).submit(generation))
    return GenerateResponse(text=text, tokens=finished.usage.completion_tokens)


@router.get("/stream", responses=_ERRORS)
async def stream(
    request: Request,
    prompt: Annotated[str, Query(max_length=1_000_000)],
    max_tokens: Annotated[int, Query(ge=1)] = 256,
):
    params = SamplingParams(max_tokens=max_tokens)
    handle = await _runner(request).submit(GenerationRequest(request_id=new_id("gen"), params=params, prompt=prompt))
    return EventStreamResponse(streams.token_stream(handle))


@router.get("/health")
async def health() -> JSONResponse:
    return JSONResponse({"status": "ok"})
