"""The build's encoding step on a Ray cluster (``--ray ADDRESS``): same shards, same bits, spread out.

The driver (``build``/``add``) plans the gallery into shards exactly as the single-process build does, and
hands the shards not yet committed to a Ray Data pipeline:

1. a dataset with one row per shard (its items and, for shard 0, the text corpus);
2. ``decode``: CPU tasks decode and preprocess the shard's images (the model's one decoding boundary,
   ``load_pixels``), the same code the single-process build runs in its DataLoader workers;
3. ``ShardEncoder``: a pool of actors, each loading the model once (one GPU each when the cluster has GPUs,
   CPU actors otherwise), encodes the images in the batches the single-process build forms, then the
   captions, and commits the shard into ``staging/`` by one rename (``encode.finish_shard``).

Ray restarts a killed actor and retries its task; a shard a retry finds committed is kept. A killed driver
leaves committed shards behind and the same command resumes from them. Building the FAISS indices,
the metadata and publishing stay in the driver. Every node must see the gallery, the model and ``--out``
at the same paths (a shared volume or file system): the actors write the shards themselves.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .encode import EncodeOptions, decode_items, encode_pixel_batches, finish_shard, pixel_batches
from .errors import BuildError
from .gallery import Item, Text

logger = logging.getLogger(__name__)


def connect(address: str) -> bool:
    """Start (``local``) or join a Ray cluster; True when this call started the connection (and so must end it)."""
    try:
        import ray
    except ImportError as exc:
        raise BuildError("--ray needs Ray: pip install 'hat-search[ray]'") from exc
    if ray.is_initialized():  # a caller (a test, a notebook) connected already: use its cluster
        return False
    _check_reachable(address)
    kwargs = {"include_dashboard": False, "logging_level": logging.WARNING, "configure_logging": True}
    try:
        if address == "local":
            ray.init(address="local", **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except Exception as exc:  # ConnectionError, ValueError, RuntimeError: all one fatal line for the build
        raise BuildError(f"--ray {address}: cannot connect to a Ray cluster ({type(exc).__name__}: {exc})") from exc
    return True


# Ray Data's helper actors (Ray 2.60): named, detached, restarted forever, and pinned to the node of the driver
# that first created them. The next driver fetches them by name. When the first driver's node has left the
# cluster (a finished `ray-build` container), every later build fails with ActorUnschedulableError.
# tests/index_builder/test_distributed_stranded.py checks that this list covers what Ray Data creates.
RAY_DATA_HELPERS = (
    ("ActorLocationTracker", "ActorLocationTracker"),
    ("AutoscalingRequester", "AutoscalingRequester"),
    ("AutoscalingCoordinator", "AutoscalingCoordinator"),
    ("DataUsageCollectionActor", "DataUsageCollectionActor"),
    ("datasets_stats_actor", "_dataset_stats_actor"),
    ("dataset_stats_summary_actor", "_dataset_stats_summary_actor"),
)
STRANDED_PROBE_S = 60.0  # Ray notices a node that vanished (no goodbye) within ~30 s; a live helper answers at once


def release_stranded_helpers(timeout: float = STRANDED_PROBE_S) -> list[str]:
    """Kill Ray Data's helper actors that can never run again (pinned to a node that has gone), so that this
    driver's pipeline creates fresh ones on its own node. Returns the names released.

    Until Ray's health checks notice that a node vanished, a helper pinned to it keeps its name and waits to
    be restarted there; a pipeline started in that window takes it and fails when Ray gives up on it. So each
    helper is asked to answer: one Ray reports unschedulable is killed (its name is free for the new one);
    one that answers, or has not answered after ``timeout`` seconds, is left alone (it may be another
    running build's)."""
    import ray
    from ray.exceptions import ActorUnschedulableError, GetTimeoutError

    probes = []
    for name, namespace in RAY_DATA_HELPERS:
        try:
            actor = ray.get_actor(name, namespace=namespace)
        except ValueError:  # no such helper (yet)
            continue
        probes.append((name, namespace, actor, actor.__ray_ready__.remote()))
    released = []
    deadline = time.monotonic() + timeout
    for name, namespace, actor, probe in probes:
        try:
            ray.get(probe, timeout=max(0.0, deadline - time.monotonic()))
        except ActorUnschedulableError:
            ray.kill(actor, no_restart=True)
            released.append((name, namespace))
        except GetTimeoutError:
            logger.warning("Ray Data's helper actor %s did not answer within %g s; left as it is", name, timeout)
        except Exception as exc:  # died for good meanwhile: its name is free again
            logger.info("Ray Data's helper actor %s: %s", name, type(exc).__name__)
    for name, namespace in released:  # the name is free once the kill is processed
        while time.monotonic() < deadline + 10:
            try:
                ray.get_actor(name, namespace=namespace)
            except ValueError:
                break
            time.sleep(0.1)
        logger.warning("released Ray Data's helper actor %s: pinned to a node that has left the cluster", name)
    return [name for name, _ in released]


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A given ``HOST:PORT`` (or ``ray://HOST:PORT``) answers a TCP connect within seconds; Ray itself
    retries an unreachable head for a minute before it gives up."""
    if address in ("local", "auto"):
        return
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise BuildError(f"--ray {address}: expected local, auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise BuildError(f"--ray {address}: cannot connect to a Ray cluster ({exc})") from exc


def pool_shape(opts, cluster: dict) -> dict:
    """Encoder actors and their resources, from the flags or the cluster's resources.

    GPUs (unless ``--device cpu``): one actor per GPU. CPU only, by default: one single-threaded actor per CPU,
    each reserving half a CPU, so that the other half of the cluster's CPUs run the decoding tasks (measured
    on 2 cores: two 1-thread actors encode as fast as one process, one 2-thread actor 30% slower;
    docs/benchmarks.md). ``--ray-actor-cpus C``: actors reserve C CPUs each, one CPU is kept for decoding,
    and each runs ``--ray-threads`` torch threads (default: C).
    """
    gpus = int(cluster.get("GPU", 0))
    cpus = float(cluster.get("CPU", 1))
    if opts.ray_actor_cpus is not None and opts.ray_actor_cpus <= 0:
        raise BuildError("--ray-actor-cpus must be above 0")
    if gpus and opts.device != "cpu":
        return {"actors": opts.ray_actors or gpus, "num_gpus": 1, "num_cpus": opts.ray_actor_cpus or 1.0,
                "threads": opts.ray_threads or 1, "device": "cuda"}
    if opts.device not in ("auto", "cpu"):
        raise BuildError(f"--device {opts.device}: the Ray cluster has no GPUs")
    if opts.ray_actor_cpus is None:
        actor_cpus = 0.5
        actors = opts.ray_actors or max(1, int(cpus))
    else:
        actor_cpus = opts.ray_actor_cpus
        actors = opts.ray_actors or max(1, int((cpus - 1) // actor_cpus))
    if actors * actor_cpus + 1 > cpus:
        raise BuildError(
            f"{actors} encoder actors × {actor_cpus:g} CPUs leave no CPU for decoding on a cluster of {cpus:g} "
            "CPUs: use fewer --ray-actors or a smaller --ray-actor-cpus (e.g. 0.5)"
        )
    return {"actors": actors, "num_gpus": 0, "num_cpus": actor_cpus,
            "threads": opts.ray_threads or max(1, int(actor_cpus)), "device": "cpu"}


def decode(row: dict, image_size: int, max_pixels: int) -> dict:
    """Ray Data task: one shard's images -> pixels of those that decode, reasons for those that do not."""
    items = [Item(**d) for d in json.loads(row["items"])]
    positions, pixels, failures = decode_items(items, image_size, max_pixels)
    if pixels is None:
        pixels = np.zeros((0, 3, image_size, image_size), np.float32)
    return {**row, "positions": np.asarray(positions, np.int64), "pixels": pixels, "failures": json.dumps(failures)}


class ShardEncoder:
    """Ray Data actor: loads the model once, encodes decoded shards and commits them into ``staging``."""

    def __init__(self, model_path: str, identity: str, device: str, threads: int, opts: EncodeOptions) -> None:
        import torch

        from model import load_model

        if device == "cpu":
            torch.set_num_threads(threads)
        self.model = load_model(model_path, device=device)
        if self.model.identity != identity:
            raise BuildError(f"{model_path} changed during the build: another model than the driver's")
        self.opts = opts

    def __call__(self, row: dict) -> dict:
        started = time.perf_counter()
        out = Path(row["out"])
        items = [Item(**d) for d in json.loads(row["items"])]
        texts = [Text(**d) for d in json.loads(row["texts"])]
        positions = [int(p) for p in row["positions"]]
        batches = pixel_batches(positions, np.asarray(row["pixels"], np.float32), self.opts.batch_size)
        ok, levels, vectors = encode_pixel_batches(self.model, batches)
        failures = {int(k): v for k, v in json.loads(row["failures"]).items()}
        summary = finish_shard(self.model, items, texts, (ok, levels, vectors, failures), out, self.opts, started)
        return {"shard": row["shard"], "images": len(items), "indexed": len(summary["items"]),
                "node": os.uname().nodename, "pid": os.getpid()}


def encode_shards(address: str, model_path: str, model, items: list[Item], texts: list[Text],
                  plan: list[tuple[int, int]], todo: list[int], shards: list[Path], opts) -> dict:
    """Encode shards ``todo`` of ``plan`` into ``shards[i]`` on Ray; returns what ran where."""
    if not todo:
        return {}
    started_here = connect(address)
    try:
        import ray
        import ray.data

        release_stranded_helpers()
        shape = pool_shape(opts, ray.cluster_resources())
        logger.info("Ray: %d shards on %d encoder actors (%s, %g CPUs each)", len(todo), shape["actors"],
                    shape["device"], shape["num_cpus"])
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = opts.progress
        ctx.execution_options.preserve_order = False
        rows = [
            {
                "shard": i,
                "out": str(Path(shards[i]).absolute()),
                "items": json.dumps([asdict(it) for it in items[plan[i][0]:plan[i][1]]]),
                "texts": json.dumps([asdict(t) for t in texts] if i == 0 else []),
            }
            for i in todo
        ]
        enc = EncodeOptions(opts.batch_size, 0, opts.max_pixels)
        image_size = model.config.image.image_size
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        # Decoding tasks reserve the memory of the pixels they hand on (one float32 image per item). That also
        # keeps Ray Data from fusing them into the encoder actors (it fuses maps whose resource requests are
        # equal), so decoding the next shards overlaps encoding; Ray Data spreads tasks over the nodes.
        pixel_bytes = 4 * 3 * image_size * image_size * max(1, max(plan[i][1] - plan[i][0] for i in todo))
        ds = ds.map(decode, fn_kwargs={"image_size": image_size, "max_pixels": opts.max_pixels}, num_cpus=1,
                    memory=pixel_bytes)
        ds = ds.map(
            ShardEncoder,
            fn_constructor_args=(os.path.abspath(model_path) if os.path.exists(model_path) else model_path,
                                 model.identity, shape["device"], shape["threads"], enc),
            compute=ray.data.ActorPoolStrategy(size=shape["actors"]),
            num_cpus=shape["num_cpus"],
            num_gpus=shape["num_gpus"],
        )
        done = []
        try:
            for row in ds.iter_rows():
                done.append(row)
                if opts.progress:
                    print(f"shard {row['shard']}: {row['indexed']}/{row['images']} images indexed on "
                          f"{row['node']}", file=sys.stderr)
        except BuildError:
            raise
        except Exception as exc:  # a task that failed past its retries: the build stops, shards stay
            raise BuildError(f"distributed encoding failed: {type(exc).__name__}: {exc}") from exc
        return {"actors": shape["actors"], "device": shape["device"], "nodes": sorted({r["node"] for r in done})}
    finally:
        if started_here:
            ray.shutdown()
