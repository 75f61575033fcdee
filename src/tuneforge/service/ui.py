"""The dashboard at ``/ui``: one static page (``static/ui.html``, plain JavaScript, no CDN, so it
works offline) that talks to the same API as every client, with a project key the user pastes
in (kept in the browser's localStorage). Live curves come from polling the job's events."""

from __future__ import annotations

from pathlib import Path

PAGE = Path(__file__).resolve().parent / "static" / "ui.html"


def mount_ui(app) -> None:
    from fastapi.responses import HTMLResponse, RedirectResponse

    @app.get("/ui", response_class=HTMLResponse, include_in_schema=False)
    def ui():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/", include_in_schema=False)
    def root():
        return RedirectResponse("/ui")
