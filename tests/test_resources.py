"""Per-stage resources (issue 15.3): the Ray requests built from a config carry each stage's own
CPUs, GPUs, memory and accelerator type; the flat `resources` block stays the default; none of it
moves a fingerprint. Pure functions: no Ray is started."""

import copy
import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import tiny_config
from proxykd import teacher
from proxykd.config import RunConfig, StageResources, apply_overrides, is_operational, load_config, parse_config
from proxykd.training import scaling_kwargs
from proxykd.vllm_actors import engine_kwargs, map_kwargs

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30


def _cfg(tmp_path, **resources) -> RunConfig:
    return parse_config(tiny_config(tmp_path / "run", resources=resources))


def _requests(cfg: RunConfig) -> dict:
    m = map_kwargs(cfg.resources, batch_size=16)
    m = {k: v for k, v in m.items() if k not in ("compute", "batch_format", "batch_size")}
    return {"teacher": teacher.actor_ray_args(cfg.resources.teacher), "vllm": m, "train": scaling_kwargs(cfg.resources),
            "engine": engine_kwargs("m", 128, 0, cfg.resources)}


def test_without_stage_blocks_the_requests_are_the_flat_blocks(tmp_path):
    r = _requests(_cfg(tmp_path))
    assert r["teacher"] == {"num_cpus": 0.5, "num_gpus": 0}
    assert r["vllm"] == {"num_cpus": 1, "num_gpus": 0}
    assert r["train"] == {"num_workers": 1, "use_gpu": False, "resources_per_worker": {"CPU": 1.0}}
    assert r["engine"]["enforce_eager"] and r["engine"]["enable_chunked_prefill"] is False
    assert "tensor_parallel_size" not in r["engine"] and r["engine"]["distributed_executor_backend"] == "uni"

    gpu = _requests(_cfg(tmp_path, use_gpu=True, train_workers=4, vllm_gpus_per_actor=2, vllm_cpus_per_actor=8,
                         vllm_actors=3))
    assert gpu["vllm"] == {"num_cpus": 8, "num_gpus": 2}
    assert gpu["train"] == {"num_workers": 4, "use_gpu": True, "resources_per_worker": {"CPU": 1.0, "GPU": 1.0}}
    assert gpu["engine"]["tensor_parallel_size"] == 2 and gpu["engine"]["enforce_eager"] is False
    assert map_kwargs(_cfg(tmp_path, vllm_actors=3).resources, 16)["compute"].min_size == 3


def test_each_stage_asks_for_its_own_cpus_gpus_memory_and_accelerator(tmp_path):
    cfg = _cfg(tmp_path, train_workers=2,
               teacher={"num_cpus": 2, "memory_gb": 1.5},
               vllm={"num_cpus": 6, "num_gpus": 4, "memory_gb": 32, "accelerator_type": "L40S"},
               train={"num_cpus": 4, "num_gpus": 1, "memory_gb": 8, "accelerator_type": "H100"})
    r = _requests(cfg)
    assert r["teacher"] == {"num_cpus": 2, "num_gpus": 0, "memory": int(1.5 * GiB)}
    assert r["vllm"] == {"num_cpus": 6, "num_gpus": 4, "memory": 32 * GiB, "accelerator_type": "L40S"}
    # the engine follows the actor's GPUs: one tensor-parallel engine over 4, GPU settings
    assert r["engine"]["tensor_parallel_size"] == 4 and r["engine"]["gpu_memory_utilization"] == 0.85
    assert "enable_chunked_prefill" not in r["engine"] and "distributed_executor_backend" not in r["engine"]
    # training on GPUs though the flat use_gpu is false: the stage's own block wins
    assert r["train"] == {"num_workers": 2, "use_gpu": True, "accelerator_type": "H100",
                          "resources_per_worker": {"CPU": 4, "GPU": 1, "memory": 8 * GiB}}
    from ray.train import ScalingConfig

    sc = ScalingConfig(**r["train"])  # Ray Train accepts them, and asks each worker for all of it
    assert sc._resources_per_worker_not_none == {"CPU": 4, "GPU": 1, "memory": 8 * GiB,
                                                 "accelerator_type:H100": 0.001}
    # and a stage block can take GPUs away: the flat block says GPU, the vLLM and train blocks CPU
    cpu = _requests(_cfg(tmp_path, use_gpu=True, vllm_gpus_per_actor=1, vllm={"num_gpus": 0}, train={"num_gpus": 0}))
    assert cpu["train"]["use_gpu"] is False and "GPU" not in cpu["train"]["resources_per_worker"]
    assert cpu["vllm"]["num_gpus"] == 0 and cpu["engine"]["enforce_eager"]
    ScalingConfig(**cpu["train"])


def test_the_requests_are_keywords_the_installed_ray_takes():
    from ray.data import Dataset

    params = inspect.signature(Dataset.map_batches).parameters
    full = StageResources(num_cpus=1, num_gpus=1, memory_gb=1, accelerator_type="A100").ray_args(0)
    assert set(full) <= set(params), set(full) - set(params)


def test_resource_keys_are_operational_and_move_no_fingerprint(tmp_path, monkeypatch):
    from proxykd import align, distill, evaluate, logits

    def hashes(cfg):
        t = teacher.config_hash(cfg.teacher, "prompts")
        a = align.config_hash(cfg, "answers")
        lg = logits.config_hash(cfg, a)
        d = distill.config_hash(cfg, lg)
        return [t, a, lg, d, evaluate.config_hash(cfg, d)]

    base_tree = tiny_config(tmp_path / "run")
    h0 = hashes(parse_config(base_tree))
    changes = ["resources.train_workers=3", "resources.use_gpu=true", "resources.vllm_gpus_per_actor=2",
               "resources.teacher.num_cpus=4", "resources.teacher.memory_gb=2",
               "resources.vllm.num_gpus=1", "resources.vllm.accelerator_type=A100",
               "resources.train.num_cpus=8", "resources.train.memory_gb=64", "resources.train.accelerator_type=H100"]
    for change in changes:
        cfg = RunConfig.model_validate(apply_overrides(copy.deepcopy(base_tree), [change]))
        assert hashes(cfg) == h0, change
    for name, field in RunConfig.model_fields["resources"].annotation.model_fields.items():
        assert is_operational(field), f"resources.{name}"
    for name, field in StageResources.model_fields.items():
        assert is_operational(field), f"StageResources.{name}"
    # the pipeline's teacher step hands the stage `resources.teacher`, and the teacher's dump (and so
    # its fingerprint) holds nothing of it
    from proxykd import pipeline

    cfg = RunConfig.model_validate(apply_overrides(copy.deepcopy(base_tree), ["resources.teacher.num_cpus=3"]))
    seen = {}
    monkeypatch.setattr(teacher, "run", lambda *args: seen.setdefault("args", args))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    pipeline.STAGE_STEPS["teacher"][1](SimpleNamespace(cfg=cfg, prompts=None, content_hash="p"))
    assert teacher.actor_ray_args(seen["args"][4])["num_cpus"] == 3
    assert seen["args"][5] == "127.0.0.1"  # where the local teacher listens (pipeline.local_teacher_host)
    assert "num_cpus" not in json.dumps(cfg.teacher.model_dump())


def test_shipped_configs_still_validate_and_bad_values_are_named(tmp_path):
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.resources.teacher == cfg.resources.vllm == cfg.resources.train == StageResources()
    with pytest.raises(Exception, match="resources.vllm.num_gpus"):
        parse_config(tiny_config(tmp_path, resources={"vllm": {"num_gpus": -1}}))
    with pytest.raises(Exception, match="resources.train.gpus: unknown key"):
        parse_config(tiny_config(tmp_path, resources={"train": {"gpus": 1}}))
