"""ServerOptions: everything the HTTP server needs besides the engine, filled from command-line flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from idefix.media import MediaPolicy


@dataclass(frozen=True)
class ServerOptions:
    """host / port: where to listen (port 0: any free port, printed at start-up); model_name: the id /v1/models
    serves ("default" is always accepted too); api_key: Bearer token required on /v1/* when set;
    cors_allow_origins: empty = CORS off; media: what image URLs / paths requests may name; max_body_bytes: request
    body cap (413 beyond); max_images_per_request: images across all messages of one request; shutdown_grace:
    seconds in-flight requests get to finish after SIGTERM; seed: seeds the process-wide generator (used by
    requests that give no seed) at start-up."""

    host: str = "127.0.0.1"
    port: int = 1234
    model_name: str = "default"
    api_key: str | None = None
    cors_allow_origins: tuple[str, ...] = ()
    media: MediaPolicy = field(default_factory=MediaPolicy)
    max_body_bytes: int = 32 * 2**20
    max_images_per_request: int = 16
    shutdown_grace: float = 30.0
    seed: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, model_name: str) -> ServerOptions:
        """From the `idefix` global flags (see `idefix.cli`); `serve` listens on 1234 unless --port says."""
        media = MediaPolicy(
            allow_private_urls=args.allow_private_media_urls,
            allowed_local_paths=tuple(args.allowed_local_media_path),
            max_image_bytes=args.max_image_bytes,
            max_pixels=args.max_image_pixels,
            connect_timeout=args.media_connect_timeout,
            total_timeout=args.media_timeout,
            max_redirects=args.media_max_redirects,
        )
        return cls(
            host=args.serve_ip,
            port=1234 if args.port is None else args.port,
            model_name=model_name,
            api_key=args.api_key or None,
            cors_allow_origins=tuple(args.cors_allow_origin),
            media=media,
            max_body_bytes=args.max_body_bytes,
            max_images_per_request=args.max_images_per_request,
            seed=args.seed,
        )
