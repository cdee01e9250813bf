"""Load generator for OpenAI-compatible chat servers (ours or any other).

`python -m cogvlm_ray.loadgen --base-url http://127.0.0.1:8000 --concurrency 1,8,32` sends
synthetic image+text chat requests at a fixed concurrency (or a Poisson request rate) and
reports TTFT, inter-token latency, end-to-end latency (p50/p90/p99), request/s, output
tokens/s and errors by status, as JSON and an optional PNG chart.

Modules: `workload` builds request bodies, `client` sends one request and times it,
`runner` drives many at a concurrency or rate, `report` turns results into figures,
`chart` draws them, `cli` parses arguments. This package is a pure HTTP client: it
imports neither torch nor ray (a unit test checks this), so it runs on any laptop.
"""
