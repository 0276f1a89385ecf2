"""The plain baseline of ``bench/serving.py``: FastAPI + uvicorn calling torch in-process.

    .venv/bin/python bench/serving_fastapi.py --port 8000

serves ``POST /predict`` on 127.0.0.1 (uvloop + httptools, access log off, one torch
thread). The model runs inline on the event loop: for a forward pass of tens of
microseconds a thread hop would cost more than it saves.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvicorn
from fastapi import FastAPI, Request, Response

from bench.serving_model import build_model, configure_torch, parse_inputs, predict


def make_app() -> FastAPI:
    """``POST /predict``: ``{"inputs": [[64 floats]]}`` → ``{"outputs": [[10 floats]]}``."""
    configure_torch()
    model = build_model()
    app = FastAPI()

    @app.post("/predict")
    async def predict_route(request: Request) -> Response:
        try:
            rows = parse_inputs(json.loads(await request.body()))
        except (ValueError, KeyError, TypeError) as exc:
            return Response(json.dumps({"detail": str(exc)}), 400, media_type="application/json")
        body = json.dumps({"outputs": predict(model, rows)})
        return Response(body, media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="FastAPI baseline for bench/serving.py")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        make_app(),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
