"""The floor of the serving stack: the least FastAPI + uvicorn can do for our requests.

    python bench/floor_app.py --port 8732 --answers DIR [--log-level info]

Not the product. Each POST route validates its body with the product's own
pydantic model (``PredictIn``, ``ScoreIn``, ``GenerateIn``, strict, from the raw
bytes, as ``app/api/bodies.py`` does) and answers with precomputed JSON bytes:
a real answer of the product for that model (``DIR/predict.json``, ...), so
the bytes on the wire are the same size. ``/sessions`` is a WebSocket that
answers each message with a precomputed ``next`` message. Served by uvicorn as
``charnn serve`` serves the product (httptools, uvloop, uvicorn's access log off,
the same log configuration), with no middleware, no dependencies and no model:
what is left of a product request's cost above this is ours.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request, Response, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ValidationError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.logs import log_config  # noqa: E402
from app.serving.schemas import GenerateIn, PredictIn, ScoreIn  # noqa: E402

ANSWERS = ("predict", "score", "generate", "ready", "next")
JSON = "application/json"


def create(answers: dict[str, bytes]) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    def route(path: str, model: type[BaseModel], answer: bytes) -> None:
        async def answer_it(request: Request) -> Response:
            try:
                model.model_validate_json(await request.body())
            except ValidationError as e:
                return Response(json.dumps({"error": str(e)}), 422, media_type=JSON)
            return Response(answer, media_type=JSON)

        app.add_api_route(path, answer_it, methods=["POST"])

    route("/predict", PredictIn, answers["predict"])
    route("/score", ScoreIn, answers["score"])
    route("/generate", GenerateIn, answers["generate"])

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type=JSON)

    ready, nxt = answers["ready"].decode(), answers["next"].decode()

    @app.websocket("/sessions")
    async def sessions(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text(ready)
        try:
            while True:
                message = json.loads(await ws.receive_text())
                if message.get("op") not in ("feed", "back", "reset"):
                    await ws.send_text('{"type":"error"}')
                    continue
                await ws.send_text(nxt)
        except WebSocketDisconnect:
            pass

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--answers", type=Path, required=True, help="folder of <name>.json answers")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args()
    answers = {name: (args.answers / f"{name}.json").read_bytes() for name in ANSWERS}
    uvicorn.run(
        create(answers),
        host="127.0.0.1",
        port=args.port,
        log_level=args.log_level,
        log_config=log_config("text", args.log_level),
        access_log=False,
        http="httptools",
    )


if __name__ == "__main__":
    main()
