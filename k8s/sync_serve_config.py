"""Copy the production Serve config (`serve_config.yaml`) into the RayService's `serveConfigV2`.

`serve_config.yaml` is the one source of the application (import path, args, deployments). The
RayService embeds the same document with two cluster-level differences that Kubernetes needs:
the proxy listens on 0.0.0.0:8000 (KubeRay's Serve Service targets that port on every pod) and
runs on every node. Run this after editing serve_config.yaml:

    python k8s/sync_serve_config.py            # rewrite k8s/rayservice.yaml
    python k8s/sync_serve_config.py --check    # exit 1 if it is out of date (CI)

`tests/unit/k8s/` fails when the two files disagree.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVE_CONFIG = REPO_ROOT / "serve_config.yaml"
RAYSERVICE = Path(__file__).resolve().parent / "rayservice.yaml"

BEGIN_MARKER = "# BEGIN serveConfigV2"
END_MARKER = "# END serveConfigV2"

#: What the RayService changes from serve_config.yaml; everything else is copied unchanged.
KUBERNETES_HTTP_HOST = "0.0.0.0"
KUBERNETES_HTTP_PORT = 8000
KUBERNETES_PROXY_LOCATION = "EveryNode"


def kubernetes_serve_config(serve_config: dict[str, Any]) -> dict[str, Any]:
    """The serveConfigV2 document for a serve config: same applications and settings, with the
    proxy on every node listening on 0.0.0.0:8000."""
    out = copy.deepcopy(serve_config)
    http_options = dict(out.get("http_options") or {})
    http_options["host"] = KUBERNETES_HTTP_HOST
    http_options["port"] = KUBERNETES_HTTP_PORT
    out["http_options"] = http_options
    out["proxy_location"] = KUBERNETES_PROXY_LOCATION
    return out


def render_block(serve_config: dict[str, Any], indent: str) -> str:
    """The `serveConfigV2: |` block (marker lines included) at the given indentation."""
    body = yaml.safe_dump(kubernetes_serve_config(serve_config), sort_keys=False, default_flow_style=False)
    lines = [
        f"{indent}{BEGIN_MARKER} (generated from serve_config.yaml by k8s/sync_serve_config.py; do not edit)",
        f"{indent}serveConfigV2: |",
        *(f"{indent}  {line}" if line else "" for line in body.splitlines()),
        f"{indent}{END_MARKER}",
    ]
    return "\n".join(lines) + "\n"


def synced_text(rayservice_text: str, serve_config: dict[str, Any]) -> str:
    """`rayservice_text` with the block between the markers regenerated."""
    lines = rayservice_text.splitlines(keepends=True)
    begin = next((i for i, line in enumerate(lines) if line.lstrip().startswith(BEGIN_MARKER)), None)
    end = next((i for i, line in enumerate(lines) if line.lstrip().startswith(END_MARKER)), None)
    if begin is None or end is None or end < begin:
        raise ValueError(f"{RAYSERVICE.name} has no '{BEGIN_MARKER}' ... '{END_MARKER}' block")
    indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
    return "".join(lines[:begin]) + render_block(serve_config, indent) + "".join(lines[end + 1 :])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the file is up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    serve_config = yaml.safe_load(SERVE_CONFIG.read_text(encoding="utf-8"))
    current = RAYSERVICE.read_text(encoding="utf-8")
    updated = synced_text(current, serve_config)
    if updated == current:
        logger.info("%s is up to date with %s", RAYSERVICE.name, SERVE_CONFIG.name)
        return 0
    if args.check:
        logger.error("%s is out of date: run python k8s/sync_serve_config.py", RAYSERVICE.name)
        return 1
    RAYSERVICE.write_text(updated, encoding="utf-8")
    logger.info("updated serveConfigV2 in %s from %s", RAYSERVICE.name, SERVE_CONFIG.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
