"""The playground's HTTP surface: page, assets and config, without a browser (tests/browser/ drives it)."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cogvlm_ray.serve.playground import ASSETS, mount_playground, read_static

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_client(*, require_api_key: bool) -> TestClient:
    app = FastAPI()
    mount_playground(app, require_api_key=require_api_key)
    return TestClient(app)


@pytest.mark.parametrize("require_api_key", [False, True])
def test_config_tells_the_page_whether_to_ask_for_a_key(require_api_key: bool) -> None:
    response = make_client(require_api_key=require_api_key).get("/playground/config.json")
    assert response.status_code == 200
    assert response.json() == {"require_api_key": require_api_key}


def test_page_is_served_at_root_with_a_strict_csp() -> None:
    response = make_client(require_api_key=False).get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    csp = response.headers["content-security-policy"]
    # No inline script and no foreign origin: the page works offline and model output cannot run code.
    assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert "connect-src 'self'" in csp
    assert "<title>CogVLM2 playground</title>" in response.text


def test_every_asset_the_page_references_is_served() -> None:
    client = make_client(require_api_key=False)
    page = client.get("/").text
    referenced = set(re.findall(r'(?:src|href)="(/[^"]+)"', page))
    assert referenced == {f"/playground/{name}" for name in ASSETS}
    for path in referenced:
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.content == read_static(path.rsplit("/", 1)[1])
    assert client.get("/playground/playground.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/playground/playground.css").headers["content-type"].startswith("text/css")


def test_static_files_load_nothing_from_other_origins() -> None:
    for name in ["index.html", *ASSETS]:
        text = read_static(name).decode()
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.IGNORECASE), name
        assert "@import" not in text, name


def test_page_uses_only_our_own_api_routes() -> None:
    script = read_static("playground.js").decode()
    fetched = set(re.findall(r'fetch\(\s*"([^"]+)"', script))
    assert fetched == {"/playground/config.json", "/v1/models", "/v1/chat/completions"}
    # Model output is rendered as text, never as markup.
    assert not re.search(r"\.(?:inner|outer)HTML\s*=|insertAdjacentHTML|document\.write", script)


def test_unknown_paths_are_not_swallowed() -> None:
    client = make_client(require_api_key=False)
    assert client.get("/playground/missing.js").status_code == 404
    assert client.post("/").status_code == 405


def test_every_static_file_ships_in_the_wheel() -> None:
    """A non-editable install (the Docker image) only has files matched by package-data."""
    tomllib = pytest.importorskip("tomllib")  # stdlib from Python 3.11
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["*"]
    static = REPO_ROOT / "cogvlm_ray" / "serve" / "static"
    for path in static.iterdir():
        assert any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns), path.name


@pytest.mark.parametrize(("playground", "api_key"), [(True, None), (True, "sk-x"), (False, None)])
def test_ingress_mounts_the_page_only_when_asked(playground: bool, api_key: str | None) -> None:
    from cogvlm_ray.serve.ingress import IngressSettings, create_app
    from tests.unit.serve.fakes import FakeBackend

    client = TestClient(create_app(FakeBackend(), IngressSettings(playground=playground, api_key=api_key)))
    if not playground:
        assert client.get("/").status_code == 404
        return
    assert client.get("/").status_code == 200
    # The page and its config stay open when /v1/* needs a key; the config says whether it does.
    assert client.get("/playground/config.json").json() == {"require_api_key": api_key is not None}
    assert client.get("/v1/models").status_code == (401 if api_key else 200)
