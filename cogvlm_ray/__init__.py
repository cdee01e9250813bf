"""cogvlm-ray: production serving of CogVLM2 on Ray Serve.

Subpackages:
  model/       native CogVLM2 in plain torch (loading, sharding, HF-compatible generate)
  preprocess/  CPU side: images, OpenAI messages -> prompt ids (PreparedPrompt)
  engine/      continuous-batching generation engine with an image-feature cache
  api/         pydantic OpenAI schemas and request <-> engine conversions
  serve/       the only code that knows Ray Serve / FastAPI / Prometheus
"""

__version__ = "0.1.0"
