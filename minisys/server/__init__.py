"""The OpenAI-compatible HTTP server (lesson 07), in vLLM's shape.

    python -m minisys serve                    # 127.0.0.1:8000, the default model
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \
         -d '{"model": "SmolLM2-135M-Instruct", "prompt": "Hello", "max_tokens": 16}'

* `protocol`: the pydantic request/response models (OpenAI's field names).
* `async_engine`: the engine stepping in the background, one output queue per request.
* `app`: the FastAPI routes (completions, chat, models, health, metrics).
* `errors`: OpenAI's error JSON and the status codes (400, 401, 404).
* `metrics`: counters and histograms rendered as Prometheus text.
* `launch`: ``python -m minisys serve``; `engine_args`: one flag per `EngineConfig` field.
"""
