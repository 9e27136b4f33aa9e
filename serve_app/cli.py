"""The `tryage` command line. Every command is a function; `main(argv)` dispatches."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from serve_app.config import LibraryError


def cmd_smoke_library(args: argparse.Namespace) -> int:
    from serve_app.smoke import build_smoke_library

    path = build_smoke_library(args.out, gpus=args.gpus, seed=args.seed)
    print(f"wrote {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a library on a local Ray instance (or RAY_ADDRESS's cluster) until Ctrl-C."""
    import ray
    from ray import serve

    from serve_app.app import build_app

    if not args.library.exists():
        raise LibraryError(
            f"no library at {args.library}; build one (tryage smoke-library DIR) "
            "and pass --library DIR/library.yaml"
        )
    app = build_app({"library": args.library})  # validate before starting Ray
    # Ctrl-C and SIGTERM stop cleanly, even where a shell started us with SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    ray.init(ignore_reinit_error=True)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name="tryage", route_prefix="/")
        print(f"tryage: serving {args.library} on http://{args.host}:{args.port} (Ctrl-C stops)")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("tryage: stopping")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def parser() -> argparse.ArgumentParser:
    from serve_app.app import DEFAULT_LIBRARY

    p = argparse.ArgumentParser(prog="tryage", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("smoke-library", help="write a tiny random library to OUT/library.yaml")
    s.add_argument("out", type=Path)
    s.add_argument("--gpus", action="store_true", help="router and experts ask for one GPU each")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_smoke_library)

    s = sub.add_parser("serve", help="serve a library with Ray Serve (blocks; Ctrl-C stops)")
    s.add_argument("--library", type=Path, default=DEFAULT_LIBRARY)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tryage` console script."""
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except LibraryError as err:
        print(f"tryage: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
