"""ServerOptions: everything the HTTP server needs besides the engine, filled from command-line flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from idefix.media import MediaPolicy


@dataclass(frozen=True)
class ServerOptions:
    """host / port: where to listen; model_name: the id /v1/models serves ("default" is always accepted
    too); api_key: Bearer token required on /v1/* when set; cors_allow_origins: empty = CORS off;
    media: what image URLs / paths requests may name; max_body_bytes: request body cap (413 beyond);
    max_images_per_request: images across all messages of one request; shutdown_grace: seconds in-flight
    requests get to finish after SIGTERM."""

    host: str = "127.0.0.1"
    port: int = 1234
    model_name: str = "default"
    api_key: str | None = None
    cors_allow_origins: tuple[str, ...] = ()
    media: MediaPolicy = field(default_factory=MediaPolicy)
    max_body_bytes: int = 32 * 2**20
    max_images_per_request: int = 16
    shutdown_grace: float = 30.0
