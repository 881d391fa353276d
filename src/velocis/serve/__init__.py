"""Serving: one inference engine behind an OpenAI-compatible HTTP API (`velocis serve`), a terminal
chat (`velocis chat`) and OpenAI batch files (`velocis batch`).

    model.py         ServedModel: model + tokenizer + name + chat template, token helpers
    chat_template.py the model's chat template, rendered as transformers does; Velocis' default
    engine_loop.py   EngineLoop (one thread steps the engine) and Submission (the asyncio side)
    params.py        request fields -> SamplingParams, OpenAI-style 400s
    openai_api.py    completions / chat / tokenize handlers, independent of HTTP
    app.py           the FastAPI app: auth, body limit, errors, SSE, disconnects
    metrics.py       Prometheus /metrics
    server.py        engine + app + uvicorn (foreground or a background thread)
    batch.py         OpenAI batch files through the same handlers
"""
