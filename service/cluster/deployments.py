"""The Ray Serve deployments of ``python -m service.cluster`` and the application that binds them."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ray import serve

from index_format import IndexRoot, open_index, shard_dir

from .. import search
from ..settings import Settings
from ..state import adopt_text_precision

logger = logging.getLogger("service.cluster")
APP_NAME = "hat"


def _threads(cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(cpus)))


@serve.deployment(name="encoder")
class QueryEncoder:
    """The model: a batch of texts or uploaded images in, their features out (service.search's encoders)."""

    def __init__(self, values: dict, cpus: float) -> None:
        from model import load_model

        _threads(cpus)
        settings = Settings(**values)
        self.model = load_model(settings.model, device=settings.resolved_device())
        self.text_precision = adopt_text_precision(self.model, settings.text_precision)
        logger.info("encoder: model %s on %s, query encoder %s", self.model.identity[:12], self.model.device,
                    self.text_precision)  # fmt: skip

    def info(self) -> dict:
        return {"identity": self.model.identity, "device": str(self.model.device),
                "image_size": int(self.model.config.image.image_size)}  # fmt: skip

    def encode_texts(self, queries: list[str]):
        return search.encode_texts(self.model, queries)

    def encode_images(self, uploads: list[bytes], max_pixels: int):
        return search.encode_images(self.model, uploads, max_pixels)

    def spans(self, texts: list[str]) -> list:
        """Each text's tokens' character spans (explained captions show their words)."""
        return [self.model.tokenizer.spans(text) for text in texts]


@serve.deployment
class ShardSearcher:
    """One shard: its index opened with ``open_index``, reopened when the shard's ``current`` moves; answers a
    batch of encoded queries as one part of ``python -m service`` would (first stage + HAT re-rank)."""

    def __init__(self, shard: int, directory: str, values: dict, cpus: float) -> None:
        _threads(cpus)
        self.shard = shard
        self.settings = Settings(**values)
        self.options = search.SearchOptions.from_settings(self.settings)
        self.root = IndexRoot(directory)
        self.lock = threading.Lock()
        self.index: Any = None
        self.error: str | None = None
        self._reload()
        if self.settings.reload_interval > 0:
            threading.Thread(target=self._poll, name=f"shard-{shard:02d}-poll", daemon=True).start()

    def _reload(self) -> None:
        name = self.root.current_version()
        if self.index is not None and name == self.index.version:
            return
        try:
            new = open_index(self.root.root)
        except Exception as exc:  # keep serving the old version; info() reports why
            self.error = f"{type(exc).__name__}: {exc}"
            logger.error("shard %02d: cannot open %s: %s", self.shard, name, self.error)
            return
        old, self.index, self.error = self.index, new, None
        logger.info("shard %02d: serving %s (%d images)", self.shard, new.version, new.num_images)
        if old is not None:  # requests in flight hold `old` for milliseconds; close it after the grace period
            threading.Timer(self.settings.reload_grace, old.close).start()

    def _poll(self) -> None:
        while True:
            time.sleep(self.settings.reload_interval)
            try:
                self._reload()
            except Exception:  # keep polling
                logger.exception("shard %02d: poll failed", self.shard)

    def info(self) -> dict:
        index = self.index
        if index is None:
            return {"shard": self.shard, "error": self.error or "nothing published"}
        return {
            "shard": self.shard, "version": index.version, "images": index.num_images,
            "captions": index.num_captions, "identity": index.model_identity, "model": index.manifest["model"],
            "store": index.manifest.get("store"), "error": None, "node": socket.gethostname(),
        }  # fmt: skip

    def rank_images(self, texts, params):
        return search.rank_images(self.index, self.lock, texts, params, self.options, "cpu")

    def image_answers(self, images, asks):
        return search.image_answers(self.index, self.lock, images, asks, self.options, "cpu")


@serve.deployment(name="ingress")
@serve.ingress()
class Ingress:
    """``python -m service``'s app with a :class:`ClusterEngine` over the encoder and the shard deployments."""

    def __init__(self, values: dict, shards: int, encoder, *searchers) -> None:
        self.values = values
        self.shards = shards
        self.encoder = encoder
        self.searchers = list(searchers)

    def __serve_build_asgi_app__(self):
        from ..app import create_app
        from .engine import ClusterEngine

        settings = Settings(**self.values)
        root = settings.index_root or ""
        return create_app(
            settings, engine=lambda metrics: ClusterEngine(settings, metrics, self.encoder, self.searchers, root)
        )


def application(values: dict, shards: int, replicas: int, cpus: dict[str, float], gpus: float, spread: bool = False):
    """The bound application: ingress, encoder and ``shards`` searcher deployments of ``replicas`` each
    (``spread``: at most one replica of a shard per node)."""
    root = Path(values["index_root"])
    encoder = QueryEncoder.options(
        ray_actor_options={"num_cpus": cpus["encoder"], "num_gpus": gpus}
    ).bind(values, max(1.0, cpus["encoder"]))
    searchers = [
        ShardSearcher.options(
            name=f"shard-{s:02d}", num_replicas=replicas, ray_actor_options={"num_cpus": cpus["shard"]},
            max_ongoing_requests=8, max_replicas_per_node=1 if spread else None,
        ).bind(s, str(shard_dir(root, s) if shards > 1 else root), values, max(1.0, cpus["shard"]))
        for s in range(shards)
    ]
    return Ingress.options(ray_actor_options={"num_cpus": cpus["ingress"]}).bind(values, shards, encoder, *searchers)


def plan_resources(total_cpus: float, total_gpus: float, shards: int, replicas: int,
                   replica_cpus: float | None) -> tuple[dict[str, float], float]:
    """CPUs per deployment replica and the encoder's GPUs: by default every replica gets an equal share of three
    quarters of the cluster's CPUs (at most 1): all of them fit, also when ``--spread`` puts a replica of every
    shard on each of two nodes beside the encoder and the ingress."""
    share = min(1.0, 0.75 * total_cpus / (shards * replicas + 2))
    shard = replica_cpus if replica_cpus is not None else share
    return {"shard": shard, "encoder": share, "ingress": min(share, 0.5)}, (1.0 if total_gpus >= 1 else 0.0)


def deploy(settings: Settings, shards: int, replicas: int, replica_cpus: float | None = None,
           spread: bool = False, proxy: str = "every-node") -> None:
    """Start Ray Serve's HTTP proxy on ``settings.host:port`` and run the application on the connected cluster;
    returns once every replica has started."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = plan_resources(resources.get("CPU", 1.0), resources.get("GPU", 0.0), shards, replicas,
                                replica_cpus)  # fmt: skip
    location = "HeadOnly" if proxy == "head-only" else "EveryNode"
    serve.start(http_options={"host": settings.host, "port": settings.port}, proxy_location=location)
    app = application(settings.model_dump(), shards, replicas, cpus, gpus, spread)
    serve.run(app, name=APP_NAME, route_prefix="/")
