"""The search service scaled out on Ray Serve: ``python -m service.cluster --index ROOT --ray ADDRESS``.

Deployments (service/cluster/deployments.py):

* ``ingress`` — the same FastAPI app as ``python -m service`` (routes, schemas, errors, ``/metrics``, page,
  OpenAPI), whose engine (:class:`ClusterEngine`) sends each batch of queries to the encoder, fans the encoded
  batch out to every shard, and merges the shards' answers by score (``service.search.answer_texts``).
* ``encoder`` — the model: ``service.search.encode_texts`` / ``encode_images`` (GPU when the cluster has one).
  The ingress's batcher (service/batching.py) gathers concurrent queries, so one encoder call is one batch.
* ``shard-NN`` — one per shard, ``--replicas`` each: opens its shard with ``open_index`` and runs what one
  part of ``python -m service`` runs (``service.search.rank_images`` / ``image_answers``): FAISS top-K and
  the HAT re-rank of its own candidates. Each replica polls its shard's ``current`` (hot reload per shard).

A shard that does not answer within ``HAT_SHARD_TIMEOUT`` (a failed call is sent again, up to 4 calls, on
another replica when there is one) is left out: the answer says ``"partial": true`` and ``"missing_shards"``,
or the search gives ``503`` with ``HAT_PARTIAL_RESULTS=false``.
"""

from .engine import ClusterEngine

__all__ = ["ClusterEngine"]
