"""HTTP routes. Thin: parse -> GenerationRequest -> serving.start -> JSON body or SSE stream."""

from __future__ import annotations

import base64
import functools
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute

from tokenmill.errors import InvalidRequest, ModelNotFound
from tokenmill.generation import GenerationRequest
from tokenmill.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
    StrictModel,
    TokenizeRequest,
    TokenizeResponse,
    new_id,
    now,
    scoring,
)
from tokenmill.protocol.anthropic import AnthropicMessageOut, CountTokensRequest, MessagesRequest, TokenCount
from tokenmill.protocol.responses_api import ResponseObject, ResponsesRequest
from tokenmill.protocol.scoring import (
    RerankRequest,
    RerankResponse,
    RerankUsage,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
    ScoreUsage,
)
from tokenmill.sampling import SamplingParams
from tokenmill.server import anthropic, responses_api, streams
from tokenmill.server.choice_text import ChoiceText
from tokenmill.server.responses import (
    GenerationResponse,
    QueuedStreamResponse,
    RefusalFrame,
    openai_refusal,
    stream_response,
    until_disconnected,
)
from tokenmill.server.serving import Generation, Serving
from tokenmill.tenants import ANONYMOUS_TENANT, Tenant
from tokenmill.tools import ToolCallFormat

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503, 504)
}


# The operational routes, named once: the app's middleware needs them (no API key on health and
# readiness; metrics only with --metrics-require-key), and the metrics label every known route.
HEALTH_PATH, READY_PATH, METRICS_PATH = "/health", "/ready", "/metrics"
OPEN_PATHS = frozenset({HEALTH_PATH, READY_PATH})


def known_paths() -> frozenset[str]:
    """Every path this router serves (requests to others are counted under 'other')."""
    return frozenset(route.path for route in router.routes if isinstance(route, APIRoute))


def _serving(request: Request) -> Serving:
    return request.app.state.serving


def _check_model(serving: Serving, model: str | None) -> str:
    name = serving.runner.model_name
    if model is not None and model != name:
        raise ModelNotFound(f"The model '{model}' does not exist; this server serves '{name}'.", param="model")
    return name


def _count_ignored(serving: Serving, body: StrictModel) -> None:
    """Fields given that change nothing: counted, so an operator sees what clients rely on."""
    for field in body.ignored_fields():
        serving.metrics.ignored_fields.labels(field.path if field.documented else "unknown").inc()


def _client_gone(request: Request) -> Callable[[], Awaitable[None]]:
    return lambda: until_disconnected(request.receive)


def _tenant(request: Request) -> Tenant:
    """Set by the middleware from the API key."""
    return request.scope.get("state", {}).get("tenant", ANONYMOUS_TENANT)


def _priority(request: Request, asked: int | None) -> int | None:
    """The body's `priority`, else the X-Priority header."""
    if asked is not None:
        return asked
    header = request.headers.get("x-priority")
    if header is None:
        return None
    try:
        return int(header)
    except ValueError:
        raise InvalidRequest("The X-Priority header must be a whole number.", param="priority") from None


async def _serve_choices(
    request: Request,
    body: ChatCompletionRequest | CompletionRequest,
    id_prefix: str,
    prompt: dict[str, Any],
    stream: streams.StreamRenderer,
    answer: streams.BodyRenderer,
    tool_format: ToolCallFormat | None = None,
    refused: RefusalFrame = openai_refusal,
) -> GenerationResponse | QueuedStreamResponse:
    """Chat and text completions alike: admit the n choices, then stream them or build the body."""
    serving = _serving(request)
    model = _check_model(serving, body.model)
    _count_ignored(serving, body)
    completion_id, created = new_id(id_prefix), now()
    choice_params = body.choice_params(tool_format)
    relay = body.relayed_fields() if serving.runner.relays else None
    start = serving.start_choices(
        GenerationRequest(request_id=completion_id, params=choice_params[0], relay=relay, **prompt),
        choice_params,
        timeout=body.timeout,
        client_gone=_client_gone(request),
        tenant=_tenant(request),
        priority=_priority(request, body.priority),
    )
    if not body.stream:
        generations = await start
        return GenerationResponse(generations, body=lambda: answer(generations, completion_id, created, model))

    def render(generations: list[Generation]) -> AsyncIterator[bytes]:
        return stream(generations, completion_id, created, model, body.include_usage, body.continuous_usage)

    return await stream_response(completion_id, start, render, serving.ping_interval, refused)


async def _serve_chat(
    request: Request,
    body: ChatCompletionRequest,
    id_prefix: str,
    stream: Callable[..., AsyncIterator[bytes]],
    answer: Callable[..., Awaitable[Any]],
    refused: RefusalFrame = openai_refusal,
) -> GenerationResponse | QueuedStreamResponse:
    """A chat request in any wire format: `stream` and `answer` render it (given the tool parser)."""
    tools = body.offered_tools()
    # the model's own call syntax: its prompt section, its grammar and its parser (None: an upstream API's)
    tool_format = _serving(request).runner.tool_call_format() if tools else None
    parser = tool_format.parser if tool_format is not None else None
    reasoning = _serving(request).reasoning
    if reasoning is not None and body.continue_final_message:
        reasoning = reasoning.after_prefill(body.messages[-1].message().content)
    split = reasoning.parser if reasoning is not None and body.reasoning_format != "none" else None
    new_output = functools.partial(ChoiceText, parser, split, body.include_reasoning)
    prompt = {"messages": body.chat_messages(), "tools": tools, "continue_final": body.continue_final_message}
    stream = functools.partial(stream, new_output=new_output)
    answer = functools.partial(answer, new_output=new_output)
    return await _serve_choices(request, body, id_prefix, prompt, stream, answer, tool_format, refused)


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=_ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    return await _serve_chat(request, body, "chatcmpl", streams.chat_stream, streams.chat_completion)


@router.post("/v1/messages", response_model=AnthropicMessageOut, responses=_ERRORS)
async def messages(body: MessagesRequest, request: Request):
    """Anthropic's Messages API: the chat path, rendered in Anthropic's shapes."""
    _count_ignored(_serving(request), body)
    if body.thinking_asked and _serving(request).reasoning is None:
        raise InvalidRequest(
            "extended thinking needs a model that reasons; the model served here writes no reasoning "
            "(see --reasoning-parser)",
            param="thinking",
        )
    return await _serve_chat(
        request, body.to_chat(), "msg", anthropic.message_stream, anthropic.message_body, anthropic.error_event
    )


@router.post("/v1/responses", response_model=ResponseObject, responses=_ERRORS)
async def responses(body: ResponsesRequest, request: Request):
    """OpenAI's Responses API, stateless: the chat path, rendered as a response object."""
    _count_ignored(_serving(request), body)
    stream = functools.partial(responses_api.response_stream, asked=body)
    answer = functools.partial(responses_api.response_body, asked=body)
    return await _serve_chat(request, body.to_chat(), "resp", stream, answer, responses_api.refusal_event)


@router.post("/v1/messages/count_tokens", response_model=TokenCount, responses=_ERRORS)
async def count_message_tokens(body: CountTokensRequest, request: Request) -> TokenCount:
    """The prompt a /v1/messages request with these turns, system prompt and tools would have."""
    serving = _serving(request)
    chat = body.to_chat()
    _check_model(serving, chat.model)
    tokens = serving.runner.tokenize(
        None, chat.chat_messages(), True, chat.offered_tools(), chat.continue_final_message
    )
    return TokenCount(input_tokens=len(tokens))


@router.post("/v1/completions", response_model=Completion, responses=_ERRORS)
async def completions(body: CompletionRequest, request: Request):
    prompt = {"prompt": body.prompt_text()}
    echo = body.echo_of()
    stream = functools.partial(streams.completion_stream, echo=echo)
    answer = functools.partial(streams.text_completion, echo=echo)
    return await _serve_choices(request, body, "cmpl", prompt, stream, answer)


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=_ERRORS)
async def embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    serving = _serving(request)
    model = _check_model(serving, body.model)
    result = await serving.embed(body.inputs(), client_gone=_client_gone(request), tenant=_tenant(request))
    width = result.vectors[0].shape[0]
    if body.dimensions is not None and body.dimensions != width:
        raise InvalidRequest(
            f"dimensions is not supported: this model's embeddings have {width} dimensions, and it is not "
            "trained to give shortened ones",
            param="dimensions",
        )
    if body.encoding_format == "base64":
        data = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in result.vectors]
    else:
        data = [v.tolist() for v in result.vectors]
    return EmbeddingResponse(
        data=[EmbeddingData(index=i, embedding=vector) for i, vector in enumerate(data)],
        model=model,
        usage=EmbeddingUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens),
    )


@router.post("/v1/rerank", response_model=RerankResponse, responses=_ERRORS, response_model_exclude_none=True)
@router.post(
    "/v2/rerank",
    response_model=RerankResponse,
    responses=_ERRORS,
    include_in_schema=False,
    response_model_exclude_none=True,
)
@router.post(
    "/rerank",
    response_model=RerankResponse,
    responses=_ERRORS,
    include_in_schema=False,
    response_model_exclude_none=True,
)
async def rerank(body: RerankRequest, request: Request) -> RerankResponse:
    """Documents ordered by their embeddings' cosine similarity to the query's (protocol/scoring.py)."""
    serving = _serving(request)
    model = _check_model(serving, body.model)
    result = await serving.embed(
        [body.query, *body.texts()], client_gone=_client_gone(request), tenant=_tenant(request)
    )
    query, *documents = result.vectors
    scores = scoring.similarities([query], documents, [(0, i) for i in range(len(documents))])
    usage = RerankUsage(total_tokens=result.prompt_tokens)
    return RerankResponse(id=new_id("rerank"), model=model, usage=usage, results=scoring.reranked(body, scores))


@router.post("/v1/score", response_model=ScoreResponse, responses=_ERRORS)
@router.post("/score", response_model=ScoreResponse, responses=_ERRORS, include_in_schema=False)
async def score(body: ScoreRequest, request: Request) -> ScoreResponse:
    """vLLM's score API: the cosine similarity of text_1's and text_2's embeddings, per pair."""
    serving = _serving(request)
    model = _check_model(serving, body.model)
    firsts, seconds = body.firsts(), body.seconds()
    result = await serving.embed([*firsts, *seconds], client_gone=_client_gone(request), tenant=_tenant(request))
    vectors = result.vectors
    scores = scoring.similarities(vectors[: len(firsts)], vectors[len(firsts) :], body.pairs())
    return ScoreResponse(
        id=new_id("score"),
        created=now(),
        model=model,
        data=[ScoreData(index=i, score=value) for i, value in enumerate(scores)],
        usage=ScoreUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens),
    )


@router.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    runner = _serving(request).runner
    _check_model(_serving(request), body.model)
    _count_ignored(_serving(request), body)
    tokens = runner.tokenize(body.prompt, body.chat_messages(), body.add_special_tokens)
    window = runner.request_tokenizer().context_window
    return TokenizeResponse(count=len(tokens), max_model_len=window, tokens=tokens)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    _check_model(_serving(request), body.model)
    return DetokenizeResponse(prompt=_serving(request).runner.detokenize(body.tokens))


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    name = _serving(request).runner.model_name
    return ModelList(data=[ModelCard(id=name, created=request.app.state.started_at)])


@router.post("/generate", response_model=GenerateResponse, responses=_ERRORS)
async def generate(body: GenerateRequest, request: Request):
    generation = await _serving(request).start(
        GenerationRequest(request_id=new_id("gen"), params=body.to_sampling_params(), prompt=body.prompt),
        client_gone=_client_gone(request),
        tenant=_tenant(request),
        priority=_priority(request, None),
    )

    async def build() -> GenerateResponse:
        result = await streams.collect(generation)
        return GenerateResponse(text=result.text, tokens=result.finished.usage.completion_tokens)

    return GenerationResponse(generation, body=build)


@router.get("/stream", responses=_ERRORS)
async def stream(
    request: Request,
    prompt: Annotated[str, Query(max_length=1_000_000)],
    max_tokens: int = 256,
):
    serving, params = _serving(request), SamplingParams(max_tokens=max_tokens)
    request_id = new_id("gen")
    start = serving.start_choices(
        GenerationRequest(request_id=request_id, params=params, prompt=prompt),
        [params],
        client_gone=_client_gone(request),
        tenant=_tenant(request),
        priority=_priority(request, None),
    )
    return await stream_response(request_id, start, lambda g: streams.token_stream(g[0]), serving.ping_interval)


# The operational routes answer HEAD too: load balancers and load tools (aiperf) probe with it.
@router.api_route(HEALTH_PATH, methods=["GET", "HEAD"])
async def health() -> JSONResponse:
    """Liveness: the process and its event loop answer."""
    return JSONResponse({"status": "ok"})


@router.api_route(READY_PATH, methods=["GET", "HEAD"])
async def ready(request: Request) -> JSONResponse:
    """Readiness: the model is loaded and its engine is up, and the server is not draining."""
    serving = _serving(request)
    lifecycle, runner = serving.lifecycle, serving.runner
    if lifecycle.ready and runner.ready:
        return JSONResponse({"status": "ready", "capacity": serving.admission.capacity})
    if lifecycle.draining:
        state = "draining"
    elif lifecycle.ready:
        state = "engine_restarting"
    else:
        state = "stopped" if lifecycle.exit_code else "starting"
    retry_after = max(1, math.ceil(runner.retry_after()))
    return JSONResponse({"status": state}, status_code=503, headers={"Retry-After": str(retry_after)})


@router.api_route(METRICS_PATH, methods=["GET", "HEAD"], include_in_schema=False)
async def metrics(request: Request) -> PlainTextResponse:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return PlainTextResponse(generate_latest(_serving(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
