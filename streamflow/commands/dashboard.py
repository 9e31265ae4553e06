"""`streamflow dashboard`: the web dashboard, served by uvicorn.

The app lives in `streamflow.dashboard` and needs the `dashboard` extra (starlette,
uvicorn, jinja2); it is imported only when the command runs, so the rest of the CLI works
without it. The socket is bound here, before uvicorn starts, so a port in use is one red
line and `--port 0` can say which port it got.
"""

from __future__ import annotations

import socket
from typing import Annotated

import typer
from rich.markup import escape

from streamflow.cli import (
    EXIT_USAGE,
    CliError,
    DatabaseUrlOption,
    _choose,
    _edge,
    _open,
    _safe,
    _stderr,
    app,
)

#: The packages of the `dashboard` extra.
EXTRA = frozenset({"starlette", "uvicorn", "jinja2", "markupsafe"})
TOKEN_ENV = "STREAMFLOW_DASHBOARD_TOKEN"


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CliError(f"cannot resolve --host {host!r}: {exc.strerror}", EXIT_USAGE) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


@app.command()
def dashboard(
    port: Annotated[
        int,
        typer.Option("--port", min=0, max=65535, help="The port to serve on (0: any free one)."),
    ] = 8080,
    host: Annotated[
        str,
        typer.Option(
            "--host",
            help="The address to bind. Anything but a loopback address makes every action "
            "require the token.",
        ),
    ] = "127.0.0.1",
    database_url: DatabaseUrlOption = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar=TOKEN_ENV,
            help="The token actions (cancel, retry, signal) must carry. Off loopback, one "
            "is generated and printed at start when none is given.",
            show_default=False,
            show_envvar=True,
        ),
    ] = None,
) -> None:
    """Serve the web dashboard: workflows by control-plane label, each workflow's DAG, a
    step's explain report and evidence, and cancel / retry / signal behind a confirmation.

    Binds 127.0.0.1 by default. Bound to any other address, actions need a token: --token,
    else $STREAMFLOW_DASHBOARD_TOKEN, else one generated now and printed once. Read pages
    need none. Ctrl-C stops it.

    **Example:** `streamflow dashboard --port 8080 --database-url postgresql://app@db/app`
    """
    try:
        import uvicorn

        from streamflow.dashboard import create_app
        from streamflow.dashboard.security import LOOPBACK_NAMES, is_loopback, token_policy
    except ModuleNotFoundError as exc:
        if exc.name not in EXTRA:
            raise
        with _edge():
            raise CliError(
                f"the dashboard needs {exc.name}: pip install 'streamflow[dashboard]'",
                EXIT_USAGE,
            ) from None
    choice = _choose(database_url)
    with _edge(choice):
        engine = _open(choice)
        try:
            sock = _bind(host, port)
        except CliError:
            engine.dispose()
            raise
    policy = token_policy(host, token)
    loopback = is_loopback(host)
    application = create_app(
        engine, token=policy.token, allowed_hosts=LOOPBACK_NAMES if loopback else None
    )
    bound = sock.getsockname()[1]
    err = _stderr()
    err.print(
        f"Streamflow dashboard on {escape(_url(host, bound))} "
        f"(database {escape(_safe(choice.url))}); Ctrl-C stops it.",
        soft_wrap=True,
    )
    if policy.generated:
        err.print(
            f"Bound to {escape(host)}, so actions need a token. Generated for this run "
            f"(set --token or {TOKEN_ENV} to choose your own): {policy.token}",
            soft_wrap=True,
            highlight=False,
        )
    elif policy.token is not None:
        err.print("Actions need the token given with --token or " + TOKEN_ENV + ".")
    server = uvicorn.Server(
        uvicorn.Config(application, log_level="warning", access_log=False, lifespan="off")
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        engine.dispose()
