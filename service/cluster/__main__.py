"""Serve an index on Ray Serve: the HTTP API of ``python -m service``, one searcher deployment per shard.

The ``HAT_*`` settings of ``python -m service`` apply (read from the environment and handed to every
deployment); ``--index`` and ``--model`` override ``HAT_INDEX_ROOT`` and ``HAT_MODEL``. Every node must see the
index root and the gallery files at the same paths.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from index_format import IndexFormatError, read_shards
from model import CommandParser

from ..settings import Settings, SettingsError

EXAMPLES = """examples:
  python -m service.cluster --index indexes/sharded --ray local --replicas 2
  RAY_ADDRESS=auto HAT_PORT=8080 python -m service.cluster --index /data/index --ray auto
"""


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m service.cluster", description=__doc__, epilog=EXAMPLES)
    p.add_argument("--index", help="index root, sharded or not (default: HAT_INDEX_ROOT)")
    p.add_argument("--model", help="model path (default: HAT_MODEL)")
    p.add_argument("--ray", default="local", help="'local' starts a Ray cluster in this process, 'auto' joins the "
                   "running one, HOST:PORT or ray://HOST:PORT a given one (default: local)")
    p.add_argument("--replicas", type=int, default=1, help="replicas of each shard's searcher (default: 1)")
    p.add_argument("--replica-cpus", type=float, help="CPUs each searcher replica reserves (default: the cluster's "
                   "CPUs shared by all replicas, the encoder and the ingress, at most 1)")
    p.add_argument("--spread", action="store_true", help="at most one replica of a shard per node (with "
                   "--replicas 2 on two nodes, each node holds every shard: either can answer alone)")
    p.add_argument("--proxy", choices=("every-node", "head-only"), default="every-node",
                   help="where Ray Serve's HTTP proxies listen: on every node that holds a replica, or only on the "
                   "head node (one entry point, e.g. a published container port)")
    p.add_argument("--host", help="HTTP address (default: HAT_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default: HAT_PORT, 8000)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env()
        values = settings.model_dump()
        for key, given in (("index_root", args.index), ("model", args.model), ("host", args.host),
                           ("port", args.port)):  # fmt: skip
            if given is not None:
                values[key] = given
        settings = Settings(**values)
        if not settings.index_root:
            raise SettingsError("--index (or HAT_INDEX_ROOT) is required")
        if args.replicas < 1:
            raise SettingsError(f"--replicas must be at least 1, got {args.replicas}")
        if settings.processes:
            raise SettingsError("HAT_PROCESSES is for python -m service: here the searches run in Ray Serve "
                                "replicas (--replicas)")  # fmt: skip
        shards = read_shards(settings.index_root) or 1
    except (SettingsError, IndexFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    from .deployments import APP_NAME, deploy

    # SIGTERM/SIGINT from here on end the service cleanly, also while Serve is still deploying (a client can see
    # /readyz answer before deploy() returns). Ray's init installs its own fatal-signal handlers in the
    # driver, so ours are set again after it.
    stop = threading.Event()

    def on_signal(*_) -> None:
        stop.set()

    def catch_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

    catch_signals()
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=args.ray, include_dashboard=False,
                     logging_level=logging.WARNING)  # fmt: skip
        except Exception as exc:  # ConnectionError, ValueError: one line, not Ray's traceback
            print(f"error: --ray {args.ray}: cannot connect to a Ray cluster ({type(exc).__name__}: {exc})",
                  file=sys.stderr)  # fmt: skip
            return 2
        catch_signals()
    deployed = not stop.is_set()
    if deployed:
        deploy(settings, shards, args.replicas, args.replica_cpus, args.spread, args.proxy)
        print(f"serving {settings.index_root} ({shards} shard(s) x {args.replicas} replica(s)) on "
              f"http://{settings.host}:{settings.port}/", flush=True)  # fmt: skip
    stop.wait()
    if deployed:  # stopped during start-up: there is no Serve application (nor instance) to take down
        serve.delete(APP_NAME)
        serve.shutdown()
    if started:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
