"""CORS, when switched on: allowed origins get their headers, refused preflights an OpenAI-shaped 400."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from idefix.server.app import OpenAICORS


def client() -> TestClient:
    app = FastAPI()
    app.add_middleware(OpenAICORS, allow_origins=["https://ok.example"], allow_methods=["*"], allow_headers=["*"])

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": []}

    return TestClient(app)


def preflight(origin: str):
    return client().options("/v1/models", headers={"Origin": origin, "Access-Control-Request-Method": "GET"})


def test_an_allowed_origin_gets_the_cors_headers() -> None:
    r = preflight("https://ok.example")
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://ok.example"
    assert (
        client().get("/v1/models", headers={"Origin": "https://ok.example"}).headers["access-control-allow-origin"]
        == "https://ok.example"
    )


def test_a_refused_preflight_is_an_openai_error() -> None:
    r = preflight("https://evil.example")
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "cors_refused"
    assert "origin" in error["message"]
    assert "access-control-allow-origin" not in r.headers
