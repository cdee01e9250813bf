"""The Dockerfile builds on the official Ray CUDA image of the pinned Ray version, installs the
package, and bakes in no weights and no secrets."""

from __future__ import annotations

import re

from tests.unit.k8s.manifests import REPO_ROOT, pinned_ray_version, pyproject

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def base_image() -> str:
    args = {}
    for keyword, rest in instructions():
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name] = default
        if keyword == "FROM":
            return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], rest.split()[0])
    raise AssertionError("no FROM")


def test_base_is_official_ray_cuda_image_of_the_pinned_version() -> None:
    image = base_image()
    repository, _, tag = image.partition(":")
    assert repository == "rayproject/ray"
    match = re.fullmatch(r"(\d+\.\d+\.\d+)-py(\d)(\d+)-(cu\d+)", tag)
    assert match, f"tag {tag!r} is not <ray version>-py<XY>-cu<NNN>"
    assert match.group(1) == pinned_ray_version()
    minimum = re.search(r">=\s*3\.(\d+)", pyproject()["project"]["requires-python"])
    assert match.group(2) == "3" and int(match.group(3)) >= int(minimum.group(1))
    # The PyTorch wheel index matches the image's CUDA.
    torch_index = next(
        rest for keyword, rest in instructions() if keyword == "ARG" and rest.startswith("TORCH_INDEX=")
    )
    assert torch_index == f"TORCH_INDEX={match.group(4)}"


def test_installs_the_package_without_weights_or_secrets() -> None:
    steps = instructions()
    copies = " ".join(rest for keyword, rest in steps if keyword in ("COPY", "ADD"))
    assert "cogvlm_ray" in copies and "pyproject.toml" in copies
    assert any(
        keyword == "RUN" and "pip install" in rest and re.search(r"""\s"?\.(\[[a-z,]+\])?"?(\s|$)""", rest)
        for keyword, rest in steps
    )
    text = " ".join(rest for _, rest in steps)
    for forbidden in (
        "safetensors ",
        "snapshot_download",
        "huggingface-cli download",
        "hf download",
        "HF_TOKEN",
    ):
        assert forbidden not in text, f"the image must not fetch or embed weights/tokens ({forbidden!r})"
    assert not any(keyword == "ADD" and "http" in rest for keyword, rest in steps)


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = {line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()}
    assert {".git", "tests", "*.safetensors"} <= ignored
    assert "cogvlm_ray" not in ignored and "pyproject.toml" not in ignored
