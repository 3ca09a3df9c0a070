"""POST /v1/embeddings in OpenAI's shape, from the served model (lesson 16, `minisys.rag.embed`).

    {"input": str | [str] | [int] | [[int]], "model"?, "encoding_format"?: "float" | "base64",
     "dimensions"?, "user"?}
    -> {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [...] | "base64"}],
        "model", "usage": {"prompt_tokens", "total_tokens"}}

The vectors are the served model's final hidden states mean-pooled over each
input's tokens and L2-normalised (the same as `LLM.embed`). ``base64`` is the
little-endian float32 bytes of the vector (what the official ``openai`` client
asks for by default and decodes). ``dimensions`` is accepted only equal to the
model's hidden size: these vectors are not trained to be truncated (OpenAI's
text-embedding-3 are), so any other value is a 400 naming it. An input longer
than the context, empty, or with ids outside the vocabulary is a 400 naming
``input``; nothing is truncated.

The forward runs in a worker thread, one embedding request at a time, beside
the engine's own thread (no KV cache: it takes no blocks from the engine).
"""
from __future__ import annotations

import asyncio
import base64
import threading
from typing import Literal, Optional, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr

from ..rag.embed import check_embedding_input, embed_token_ids
from .errors import OpenAIError
from .openapi import _add_schema, error_responses, json_response

EmbeddingInput = Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings (OpenAI's fields; anything else is a 400 naming it)."""

    model_config = ConfigDict(extra="forbid")
    input: EmbeddingInput
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[StrictInt] = None
    user: Optional[str] = None

    def inputs(self) -> list[Union[str, list[int]]]:
        """The inputs as a list: each a string or a list of token ids. ValueError if there are none."""
        x = self.input
        if isinstance(x, str):
            return [x]
        if not x:
            raise ValueError("input is empty: give a string, a list of token ids, or a list of either")
        if all(isinstance(t, int) for t in x):
            return [list(x)]
        return list(x)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


def model_of(engine):
    """The `LlamaModel` behind an `AsyncLLMEngine` (``.engine.model``) or `AsyncEagerEngine` (``.runner.model``);
    None when the engine has none that can embed on its own (a test double; a tensor-parallel shard)."""
    inner = getattr(engine, "engine", None) or getattr(engine, "runner", None)
    model = getattr(inner, "model", None)
    return model if model is not None and getattr(model, "tp_size", 1) == 1 else None


def encode_vector(v: np.ndarray, encoding_format: str) -> Union[list[float], str]:
    """A vector as floats, or as base64 of its little-endian float32 bytes (OpenAI's encoding)."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in v]


class _Embedder:
    """Tokenize, check and embed one request's inputs (blocking: run it in a worker thread)."""

    def __init__(self, server, model) -> None:
        self.server, self.model = server, model
        self.lock = threading.Lock()          # one embedding forward at a time

    def ids(self, req: EmbeddingRequest) -> list[list[int]]:
        inputs = req.inputs()
        limit = self.server.admission.limits.max_prompts_per_request
        if len(inputs) > limit:
            raise ValueError(f"input: {len(inputs)} inputs is more than this server's limit of {limit} "
                             f"per request (--max-prompts-per-request)")
        cfg = self.model.config
        max_len = min(self.server.engine.max_model_len, cfg.max_position_embeddings)
        out = []
        for i, x in enumerate(inputs):
            where = "input" if len(inputs) == 1 else f"input[{i}]"
            if isinstance(x, str) and not x:
                raise ValueError(f"{where}: the text is empty")
            ids = self.server.tokenizer.encode(x, limit=max_len) if isinstance(x, str) else list(x)
            check_embedding_input(ids, cfg.vocab_size, max_len, where)
            out.append(ids)
        return out

    def embed(self, ids: list[list[int]]) -> np.ndarray:
        with self.lock:
            return embed_token_ids(self.model, ids).numpy()                   # (B, C) fp32


def install_embeddings(app: FastAPI, server, parse) -> None:
    """Register POST /v1/embeddings on ``app`` (``server``: the app's `Server`; ``parse``: its body parser,
    ``await parse(raw, Model)``) and add its request body to the OpenAPI document."""
    model = model_of(server.engine)
    embedder = _Embedder(server, model) if model is not None else None
    hidden = model.config.hidden_size if model is not None else None
    auth = (401,) if server.api_key else ()
    turn = asyncio.Lock()

    @app.post("/v1/embeddings", responses={**json_response(EmbeddingResponse, "one vector per input"),
                                           **error_responses(400, *auth, 404, 413, 429, 500, 503)})
    async def embeddings(raw: Request):
        req = await parse(raw, EmbeddingRequest)
        server.check_model(req.model)
        if embedder is None:
            raise OpenAIError("this server does not serve embeddings: they run the model on one process "
                              "(not with --tensor-parallel-size > 1)", status=400)
        if server.draining:
            raise OpenAIError("the server is shutting down; retry later or elsewhere", status=503,
                              type="service_unavailable", code="server_shutting_down")
        if req.dimensions is not None and req.dimensions != hidden:
            raise OpenAIError(f"dimensions: the served model's vectors have {hidden} dimensions and are not "
                              f"trained to be truncated; leave dimensions unset (or {hidden})", param="dimensions")
        try:
            ids = await asyncio.to_thread(embedder.ids, req)
        except ValueError as e:
            raise OpenAIError(str(e), param="input") from None
        tokens = sum(len(x) for x in ids)
        # counted in the server's admission limits like a completion (429 when the queue is full), and one
        # forward at a time: waiters wait here, holding no worker thread
        ticket = server.admission.admit([len(x) for x in ids], 1, req.user)
        try:
            async with turn:
                vectors = await asyncio.to_thread(embedder.embed, ids)
        finally:
            server.admission.release(ticket)
        data = [EmbeddingData(index=i, embedding=encode_vector(v, req.encoding_format)) for i, v in enumerate(vectors)]
        body = EmbeddingResponse(data=data, model=server.model_name,
                                 usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
        return JSONResponse(body.model_dump())

    _document_body(app, "/v1/embeddings", EmbeddingRequest)


def _document_body(app: FastAPI, path: str, model: type[BaseModel]) -> None:
    """Add ``model`` as ``path``'s required JSON body to the app's (lazily built) OpenAPI document."""
    build = app.openapi

    def openapi():
        doc = build()
        op = doc["paths"][path]["post"]
        if "requestBody" not in op:
            _add_schema(doc["components"]["schemas"], model)
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        return doc

    app.openapi = openapi       # type: ignore[method-assign]
