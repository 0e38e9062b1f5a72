"""`slmops serve MODEL`: an OpenAI-compatible server on uvicorn; Ctrl-C or SIGTERM lets in-flight
requests finish, then exits 0."""

from __future__ import annotations

import argparse

from slmops.cli import add_log_level
from slmops.cli.flags import add_options, given
from slmops.options.serve_options import ServeOptions


def register(sub: argparse._SubParsersAction, full: bool = True) -> dict:
    p = sub.add_parser("serve", help="serve a model and its adapters with OpenAI's API (chat, completions, models)",
                       description="Serve MODEL over HTTP with OpenAI's API: every adapter is a model id, and "
                                   "requests for different adapters are decoded together. See docs/serve.md.")
    p.add_argument("model", nargs="?", metavar="MODEL", help="the model to serve (or -m/--model_name_or_path)")
    add_options(p, ServeOptions)
    for action in p._actions:
        if action.dest == "model_name_or_path":
            action.required = False  # MODEL may come positionally
    add_log_level(p)
    return {"serve": handle}


def handle(args: argparse.Namespace) -> int:
    import signal

    import uvicorn

    from slmops.serving.app import create_app, open_pool

    options = given(args, "model")
    if args.model:
        options.setdefault("model_name_or_path", args.model)
    opts = ServeOptions.build(**options)
    # uvicorn drains on SIGTERM, then raises the signal again for the handler it found: a drain is a clean exit
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    pool = open_pool(opts)  # before listening: a model or adapter that cannot be served is one line, exit 2
    app = create_app(opts, pool)

    class Draining(uvicorn.Server):
        """On SIGTERM or Ctrl-C, /health and new requests answer 503 while the ones in flight finish."""

        def handle_exit(self, sig: int, frame: object) -> None:
            app.state.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=opts.host, port=opts.port, access_log=False, log_level="warning",
                            timeout_graceful_shutdown=int(opts.request_timeout))
    Draining(config).run()
    return 0
