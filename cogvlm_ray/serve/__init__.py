"""The Ray Serve application: the only package that knows Ray Serve, FastAPI and Prometheus.

  args.py          AppArgs: the config's `args:`, validated straight into EngineConfig / PreprocessOptions
  app.py           the three deployments and build_app (the config's import_path)
  ingress.py       create_app(backend) -> FastAPI: OpenAI routes, limits, errors, SSE
  backend.py       the ingress's ChatBackend over deployment handles (admission, readiness)
  server.py        ModelServer (engine + metrics) and PreprocessServer, plain classes
  factories.py     replica-side builders: engine on the replica's GPUs, preprocessor
  model_source.py  checkpoint location: local dir, hub id, or tiny-random (random weights)
  metrics.py       every Prometheus metric, defined once; multiprocess + Ray exporters
  router.py        image-affinity request router for the ModelServer (affinity.py: policy)
  playground.py    the browser page at / (static/)

See docs/serving.md.
"""
