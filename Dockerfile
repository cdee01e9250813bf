# cogvlm-ray serving image for KubeRay (head, CPU and GPU workers all run this image).
#
# The base MUST be the official Ray image of the exact Ray version pinned in pyproject.toml
# (ray[serve]==2.60.0) and the same Python minor version: KubeRay's `rayVersion`, the image's Ray
# and the package's pin have to agree, or head and workers refuse to join. The CUDA tag must be
# supported by the GPU nodes' driver (CUDA 12.8 needs driver >= 570). No model weights are baked
# in: replicas read them from the Hugging Face cache on the model-cache volume (see
# docs/kubernetes.md).
#
#   docker build -t ghcr.io/example/cogvlm-ray:0.1.0 .
#   docker build --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-cu124 --build-arg TORCH_INDEX=cu124 ...
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${RAY_IMAGE}

# PyTorch wheel index matching the base image's CUDA (cu128 wheels for the -cu128 image).
ARG TORCH_INDEX=cu128

# procps: `pgrep` in the worker preStop hook, which waits for Serve replicas to leave a
# draining node. wget: the KubeRay probes.
USER root
RUN apt-get update \
    && apt-get install -y --no-install-recommends procps wget \
    && rm -rf /var/lib/apt/lists/*
USER ray

WORKDIR /home/ray/cogvlm-ray
# Dependencies first (cached layer), then the package itself, with the `quant` extra
# (bitsandbytes, torchao) so `quantization:` settings work in the image.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users cogvlm_ray ./cogvlm_ray
RUN pip install --no-cache-dir \
        --extra-index-url "https://download.pytorch.org/whl/${TORCH_INDEX}" \
        ".[quant]" \
    && python -c "import importlib.metadata as m, ray; \
v = [r for r in m.requires('cogvlm-ray') if r.startswith('ray')][0]; \
assert ray.__version__ in v, f'base image has ray {ray.__version__}, package pins {v}'; \
import cogvlm_ray.serve.app"

# Cache location; the RayService mounts the model-cache PVC here and sets the same variable.
ENV HF_HOME=/models/hf \
    HF_HUB_DISABLE_TELEMETRY=1 \
    RAY_USAGE_STATS_ENABLED=0

WORKDIR /home/ray
