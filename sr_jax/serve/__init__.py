"""Serving SpatialReward over HTTP, one module per layer:

- `protocol`: what a request may be (`ServeConfig` limits, `parse_request`, bounded JSON, image
  headers and decoding, option checks, `RequestError` and its `reason` names); pure and sync.
- `batching`: memory admission (`MemoryBudget`, `Reservation`), the queue that groups items into
  model calls (`Batcher`), cancellation, Prometheus counters (`Metrics`).
- `server`: the aiohttp app (`RewardServer`, `BackgroundServer`) and `sr-jax serve`.
- `client`: `RewardClient` (urllib, numpy, PIL; no aiohttp) for trainers calling a server.

Nothing is imported here, so `sr_jax.serve.client` does not pull in aiohttp.
"""
