"""The web dashboard: `streamflow dashboard` serves `create_app(engine)` with uvicorn.

Needs the `dashboard` extra (starlette, uvicorn, jinja2). See docs/dashboard.md.
"""

from streamflow.dashboard.app import create_app

__all__ = ["create_app"]
