"""The OpenAI Images API (`POST /v1/images/generations`, `/edits`, `/variations`, `GET /v1/models`) and the
playground page (`/`), in front of the server-side generation model (`kandinsky`) over gRPC streaming.

- `fields.py`: OpenAI's request fields -> `GenerationRequest` (which mode, which fields);
- `triton.py`: the `kandinsky` model from asyncio (limits, readiness, one stream per request, cancelled
  when the HTTP client goes away);
- `app.py`: the Starlette app (routes, OpenAI's server-sent events, body caps, the bearer token);
- `errors.py`: OpenAI's error object and the status of each of the server's errors;
- `server.py`: `kandinsky-openai` and `OpenAIServer` (uvicorn in a thread, for kandinsky-serve);
- `playground/`: the page (plain HTML, JavaScript and CSS; no build step).
"""
