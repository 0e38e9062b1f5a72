"""The review server: FastAPI routes over the votes database, served by uvicorn like `slmops serve`.

A reviewer names themself once at `/` and gets a secret link `/r/TOKEN` (also kept in a cookie, so the
front page brings them back). Every page is rendered from the database, so a reload, a closed tab or a
restarted server shows the reviewer's next item without a vote. Votes come as a form post (the page) or
JSON; a refused one answers 4xx in kind (HTML for the page, JSON for JSON) and changes nothing. The
results view needs the review's results key, printed when the server starts, so reviewers never see it.
"""

from __future__ import annotations

import json
import secrets
from contextlib import closing
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from slmops.review import ballots, collect, pages, tally
from slmops.review.ballots import Refused

COOKIE = "slmops_reviewer"
MAX_BODY = 16 * 1024
NO_STORE = {"Cache-Control": "no-store"}


routes = APIRouter()


def create_app(folder: Path) -> FastAPI:
    """The review site for one review folder."""
    app = FastAPI(title="slmops review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.folder = folder
    app.include_router(routes)

    @app.exception_handler(Refused)
    async def refused(request: Request, err: Refused) -> Response:
        if _wants_json(request):
            return JSONResponse({"error": str(err)}, status_code=err.status)
        return HTMLResponse(pages.error(err.status, str(err)), status_code=err.status)

    return app


def _connect(request: Request) -> Any:
    """A connection of this request's own, closed after it (SQLite connections do not cross threads well)."""
    return closing(ballots.connect(request.app.state.folder / collect.VOTES))


@routes.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@routes.get("/")
def front(request: Request) -> Response:
    token = request.cookies.get(COOKIE)
    if token:
        with _connect(request) as db:
            if db.execute("SELECT 1 FROM reviewers WHERE token = ?", (token,)).fetchone():
                return RedirectResponse(f"/r/{token}", status_code=303)
    return HTMLResponse(pages.landing(), headers=NO_STORE)


@routes.post("/start")
async def start(request: Request) -> Response:
    fields = await _fields(request)

    def join() -> str:
        with _connect(request) as db:
            return ballots.join(db, str(fields.get("name", "")), request.cookies.get(COOKIE))

    try:
        token = await run_in_threadpool(join)
    except Refused as err:
        if _wants_json(request):
            raise
        return HTMLResponse(pages.landing(str(err)), status_code=err.status)
    response: Response = JSONResponse({"reviewer": f"/r/{token}"}) if _wants_json(request) else \
        RedirectResponse(f"/r/{token}", status_code=303)
    response.set_cookie(COOKIE, token, max_age=90 * 24 * 3600, httponly=True, samesite="strict")
    return response


@routes.get("/r/{token}")
def item(token: str, request: Request) -> Response:
    with _connect(request) as db:
        name = ballots.reviewer(db, token)
        shown = ballots.next_item(db, name)
        done, total = ballots.progress(db, name)
    html = pages.finished(name, total) if shown is None else pages.review(name, token, shown, done, total)
    return HTMLResponse(html, headers=NO_STORE)


@routes.post("/r/{token}/vote")
async def vote(token: str, request: Request) -> Response:
    fields = await _fields(request)

    def cast() -> None:
        with _connect(request) as db:
            ballots.cast(db, ballots.reviewer(db, token), str(fields.get("ticket", "")),
                         str(fields.get("choice", "")), str(fields.get("comment", "")))

    await run_in_threadpool(cast)
    if _wants_json(request):
        return JSONResponse({"stored": True, "next": f"/r/{token}"})
    return RedirectResponse(f"/r/{token}", status_code=303)


@routes.get("/results")
def results(request: Request, key: str = "") -> Response:
    summary, _ = _results(request, key)
    return HTMLResponse(pages.results(summary, key), headers=NO_STORE)


@routes.get("/results/votes.csv")
def votes_csv(request: Request, key: str = "") -> Response:
    _, votes = _results(request, key)
    return PlainTextResponse(tally.votes_csv(votes), media_type="text/csv", headers=NO_STORE)


def _results(request: Request, key: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with _connect(request) as db:
        if not secrets.compare_digest(key.encode(), ballots.meta(db, "results_key").encode()):
            raise Refused(403, "the results need the review's results key (printed when the server started)")
    return collect.summary(request.app.state.folder)


def _wants_json(request: Request) -> bool:
    return "json" in request.headers.get("content-type", "") or "json" in request.headers.get("accept", "")


async def _fields(request: Request) -> dict[str, Any]:
    """A form's or a JSON object's fields; anything else, or too large, is refused."""
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        raise Refused(413, f"request body over {MAX_BODY} bytes")
    body = await request.body()
    if len(body) > MAX_BODY:
        raise Refused(413, f"request body over {MAX_BODY} bytes")
    if "json" in request.headers.get("content-type", ""):
        try:
            fields = json.loads(body or b"null")
        except ValueError:
            fields = None
        if not isinstance(fields, dict):
            raise Refused(400, "the body must be a JSON object")
        return fields
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True).items()}
