"""AppArgs, build_app and the shipped Serve configs (no cluster needed)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cogvlm_ray.engine.config import EngineConfig
from cogvlm_ray.preprocess.options import PreprocessOptions
from cogvlm_ray.serve.app import INGRESS, MODEL_SERVER, PREPROCESSOR, build_app
from cogvlm_ray.serve.args import AppArgs, parse_args
from cogvlm_ray.serve.factories import NoGPUError, device_map_for

REPO = Path(__file__).resolve().parents[3]
CONFIGS = ["serve_config.yaml", "serve_config.local.yaml", "serve_config.int4.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_validate_against_serve_schema_and_app_args(name: str):
    config = load(name)
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "cogvlm_ray.serve.app:build_app"
    args = AppArgs.model_validate(app["args"])
    assert {d["name"] for d in app["deployments"]} == {PREPROCESSOR, MODEL_SERVER, INGRESS}
    model = next(d for d in app["deployments"] if d["name"] == MODEL_SERVER)
    assert "max_ongoing_requests" not in model and "max_queued_requests" not in model, (
        "set by build_app from args"
    )
    assert model.get("graceful_shutdown_timeout_s", 0) >= args.shutdown_timeout_s


def test_production_config_is_the_real_model_on_gpus():
    config = load("serve_config.yaml")
    (app,) = config["applications"]
    args = AppArgs.model_validate(app["args"])
    assert (args.model, args.dtype, args.device) == ("THUDM/cogvlm2-llama3-chat-19B", "bfloat16", "cuda")
    deployments = {d["name"]: d for d in app["deployments"]}
    assert deployments[MODEL_SERVER]["ray_actor_options"]["num_gpus"] >= 1
    assert deployments[MODEL_SERVER]["autoscaling_config"]["max_replicas"] > 1
    for name in (PREPROCESSOR, INGRESS):
        assert "num_gpus" not in deployments[name]["ray_actor_options"]
        assert "autoscaling_config" in deployments[name]


def test_local_config_fits_two_cores_with_random_weights_labelled():
    text = (REPO / "serve_config.local.yaml").read_text()
    assert "RANDOM WEIGHTS" in text
    (app,) = yaml.safe_load(text)["applications"]
    assert app["args"]["model"].startswith("tiny-random") and app["args"]["device"] == "cpu"
    cpus = [d["ray_actor_options"]["num_cpus"] * d.get("num_replicas", 1) for d in app["deployments"]]
    assert sum(cpus) <= 1.5


@pytest.mark.parametrize(
    "args",
    [{"modle": "x"}, {"dtype": "int3"}, {"engine": {"max_num_seqs": 0}}, {"engine": {"batch": 4}},
     {"preprocess": {"allow_ftp": True}}, {"request_timeout_s": -1}],
)  # fmt: skip
def test_bad_args_fail_with_a_clear_message(args):
    with pytest.raises(ValueError, match="invalid cogvlm_ray app args"):
        parse_args(args)


def test_build_app_binds_three_deployments_with_engine_sized_model_options(tmp_path: Path):
    app = build_app({"model": "tiny-random", "engine": {"max_num_seqs": 6}, "max_queued_requests": 9,
                     "metrics_dir": str(tmp_path / "prom")})  # fmt: skip
    ingress = app._bound_deployment
    assert ingress.name == INGRESS
    _, preprocessor, model = (getattr(a, "_bound_deployment", a) for a in ingress.init_args)
    assert preprocessor.name == PREPROCESSOR
    assert model.name == MODEL_SERVER
    assert model.max_ongoing_requests == 6
    assert model.max_queued_requests == 9
    assert (tmp_path / "prom").is_dir()


def test_served_model_name_defaults_to_the_checkpoint_name():
    assert AppArgs().model_name == "cogvlm2-llama3-chat-19B"
    assert AppArgs(model="/models/x/", served_model_name=None).model_name == "x"
    assert AppArgs(served_model_name="mine").model_name == "mine"


def test_device_map_follows_the_gpus_ray_assigned():
    assert device_map_for("cpu", 4) is None
    assert device_map_for("auto", 0) is None
    assert device_map_for("auto", 1) == "cuda:0"
    assert device_map_for("cuda", 2) == "balanced"
    with pytest.raises(NoGPUError, match="num_gpus"):
        device_map_for("cuda", 0)


def test_engine_and_preprocess_args_are_the_library_dataclasses_field_for_field():
    """A field added to EngineConfig / PreprocessOptions is a Serve arg at once (no mirror to keep)."""
    every_engine_field = {f.name: getattr(EngineConfig(), f.name) for f in dataclasses.fields(EngineConfig)}
    every_preprocess_field = {
        f.name: getattr(PreprocessOptions(), f.name) for f in dataclasses.fields(PreprocessOptions)
    }
    args = parse_args(
        {"engine": {**every_engine_field, "max_num_seqs": 3}, "preprocess": every_preprocess_field}
    )
    assert args.engine == EngineConfig(max_num_seqs=3) and isinstance(args.preprocess, PreprocessOptions)
    assert AppArgs().engine == EngineConfig() and AppArgs().preprocess == PreprocessOptions()
    # The dataclasses' own checks run at the edge, and unknown keys are named.
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= max_num_seqs"):
        parse_args({"engine": {"max_num_seqs": 64, "max_num_batched_tokens": 8}})
    with pytest.raises(ValueError, match="allow_local_files needs local_files_dir"):
        parse_args({"preprocess": {"allow_local_files": True}})
    with pytest.raises(ValueError, match=r"engine\.batch"):
        parse_args({"engine": {"batch": 4}})


def test_sampling_defaults_have_one_source():
    from cogvlm_ray.api.chat import ChatDefaults
    from cogvlm_ray.contracts import SamplingParams

    args, chat, sampling = AppArgs(), ChatDefaults(), SamplingParams()
    assert args.default_max_tokens == chat.max_tokens == sampling.max_tokens
    assert args.default_temperature is None  # None: the checkpoint's generation_config.json, else:
    assert args.chat_defaults.temperature == chat.temperature == sampling.temperature
    assert args.chat_defaults == chat
    with pytest.raises(ValueError, match="temperature"):
        parse_args({"default_temperature": 3.0})


def test_sampling_defaults_come_from_generation_config_unless_set(tmp_path, caplog):
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.8, "top_p": 0.8, "top_k": 1, "max_length": 8192})
    )
    defaults = AppArgs().chat_defaults_for(tmp_path)
    assert (defaults.temperature, defaults.top_p, defaults.top_k) == (0.8, 0.8, 1)
    assert AppArgs(default_temperature=0.3).chat_defaults_for(tmp_path).temperature == 0.3
    assert AppArgs().chat_defaults_for(tmp_path / "missing") == AppArgs().chat_defaults  # documented fallback
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 9.0}))
    assert AppArgs().chat_defaults_for(tmp_path).temperature == 1.0  # out of range: skipped, warned
    assert "generation_config.json" in caplog.text


def test_metrics_directory_env_var_wins(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert AppArgs(metrics_dir="~/m").metrics_directory.endswith("/m")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/elsewhere")
    assert AppArgs(metrics_dir="~/m").metrics_directory == "/elsewhere"
