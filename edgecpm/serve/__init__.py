"""`edgecpm serve BUNDLE`: an OpenAI-compatible HTTP server over one Engine (Starlette + uvicorn).

    edgecpm serve bundles/smollm2-135m --port 8000
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")

Endpoints: /v1/chat/completions (streaming or not, tools, response_format), /v1/completions, /v1/models,
/health and /metrics (Prometheus text). Every refusal is an OpenAI-shaped error object with a 4xx status
(edgecpm.serve.errors). One model runs one request at a time; the others wait in a bounded queue.
"""
