"""The speech gateway: OpenAI's speech API in front of every fleet (`ttsfleet gateway`).

- `app`: the ASGI app (Starlette) and the request path: validation, auth, balancing,
  streaming; `server`: uvicorn and the background reloads (config, JWKS, endpoints);
- `audio`: the formats, encoded while they stream; `auth`: JWT bearer tokens;
- `config`: the gateway's config document; `fleet`: one fleet's state for `routing`.
"""
