"""Tests for proxykd.config: loading, strict validation with dotted keys, overrides, fingerprints."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from proxykd.config import ConfigError, RunConfig, apply_overrides, fingerprint, load_config

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {"proxy": {"tiny": {}}, "student": {"tiny": {}}}


def write_yaml(tmp_path, tree, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


def merged(extra):
    """MINIMAL with `extra` deep-merged in (a fresh copy every call)."""

    def merge(a, b):
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    return merge({"proxy": {"tiny": {}}, "student": {"tiny": {}}}, extra)


def test_minimal_config_loads_with_defaults(tmp_path):
    cfg = load_config(write_yaml(tmp_path, MINIMAL))
    assert isinstance(cfg, RunConfig)
    assert cfg.proxy.tiny is not None and cfg.proxy.path is None
    assert cfg.student.tiny is not None
    # a few documented defaults (paper: alpha 100, top-10 logits, split 10/45/45)
    assert cfg.distill.alpha == 100.0
    assert cfg.logits.top_k == 10
    assert (cfg.data.split.warmup, cfg.data.split.proxy, cfg.data.split.student) == (0.1, 0.45, 0.45)


def test_empty_file_fails_naming_missing_models(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "proxy" in str(e.value) and "student" in str(e.value)


def test_top_level_must_be_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_missing_file_fails(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "extra, dotted",
    [
        ({"runn_dir": "x"}, "runn_dir"),
        ({"distill": {"alphaa": 1.0}}, "distill.alphaa"),
        ({"align": {"warmup": {"lrr": 0.1}}}, "align.warmup.lrr"),
        ({"proxy": {"tiny": {"hidden": 64}}}, "proxy.tiny.hidden"),
        ({"data": {"split": {"eval": 0.1}}}, "data.split.eval"),
    ],
)
def test_unknown_keys_fail_with_dotted_path(tmp_path, extra, dotted):
    with pytest.raises(ConfigError) as e:
        load_config(write_yaml(tmp_path, merged(extra)))
    msg = str(e.value)
    assert dotted in msg
    assert "unknown key" in msg


@pytest.mark.parametrize(
    "extra, dotted",
    [
        ({"distill": {"train": {"lr": -1e-4}}}, "distill.train.lr"),
        ({"align": {"warmup": {"lr": 0}}}, "align.warmup.lr"),
        ({"teacher": {"top_p": 1.5}}, "teacher.top_p"),
        ({"align": {"sampling": {"top_p": 0}}}, "align.sampling.top_p"),
        ({"data": {"split": {"warmup": 0.2, "proxy": 0.45, "student": 0.45}}}, "data.split"),
        ({"data": {"eval_fraction": 1.0}}, "data.eval_fraction"),
        ({"proxy": {"tiny": {"hidden_size": 64, "num_heads": 4}}}, "proxy.tiny"),
        ({"student": {"tiny": {"hidden_size": 100, "num_heads": 3}}}, "student.tiny"),
        ({"proxy": {"path": "some/model"}}, "proxy"),
        ({"data": {"source": "file"}}, "data"),
        ({"distill": {"alpha": -1}}, "distill.alpha"),
        ({"run_dir": "  "}, "run_dir"),
    ],
)
def test_bad_values_fail_naming_the_key(tmp_path, extra, dotted):
    with pytest.raises(ConfigError) as e:
        load_config(write_yaml(tmp_path, merged(extra)))
    lines = [ln.strip() for ln in str(e.value).splitlines()]
    # the offending key heads one of the error lines, e.g. "data.split: Value error, ..."
    assert any(ln.startswith(dotted + ":") for ln in lines), str(e.value)


def test_error_messages_say_what_is_wrong(tmp_path):
    cases = [
        ({"data": {"split": {"warmup": 0.5}}}, "sum to 1"),
        ({"proxy": {"tiny": {"hidden_size": 64, "num_heads": 4}}}, "16"),
        ({"proxy": {"path": "x"}}, "exactly one of `path` or `tiny`"),
        ({"data": {"source": "file"}}, "data.path"),
    ]
    for extra, needle in cases:
        with pytest.raises(ConfigError) as e:
            load_config(write_yaml(tmp_path, merged(extra)))
        assert needle in str(e.value)


def test_file_source_with_path_is_valid(tmp_path):
    cfg = load_config(write_yaml(tmp_path, merged({"data": {"source": "file", "path": "p.jsonl"}})))
    assert cfg.data.source == "file" and cfg.data.path == "p.jsonl"


def test_overrides_apply_with_yaml_typing(tmp_path):
    path = write_yaml(tmp_path, merged({"teacher": {"base_url": "https://example.invalid/v1"}, "align": {"rounds": 3}}))
    cfg = load_config(
        path,
        [
            "distill.alpha=100",
            "align.rounds=0",
            "teacher.base_url=null",
            "data.tasks=[{name: chain_sum, size: 5}]",
            "distill.train.lr=1e-4",
            "distill.baseline=false",
        ],
    )
    assert cfg.distill.alpha == 100.0
    assert cfg.align.rounds == 0
    assert cfg.teacher.base_url is None
    assert len(cfg.data.tasks) == 1
    assert cfg.data.tasks[0].name == "chain_sum" and cfg.data.tasks[0].size == 5
    assert cfg.data.tasks[0].kwargs == {}
    assert cfg.distill.train.lr == pytest.approx(1e-4)
    assert cfg.distill.baseline is False


def test_override_creates_missing_sections(tmp_path):
    cfg = load_config(write_yaml(tmp_path, MINIMAL), ["resources.train_workers=3", "align.dpo.epochs=2"])
    assert cfg.resources.train_workers == 3
    assert cfg.align.dpo.epochs == 2
    assert cfg.align.warmup.epochs == 1  # untouched sibling section keeps its defaults


def test_override_is_validated(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write_yaml(tmp_path, MINIMAL), ["distill.alphaa=1"])
    assert "distill.alphaa" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(write_yaml(tmp_path, MINIMAL), ["teacher.top_p=2"])
    assert "teacher.top_p" in str(e.value)


def test_override_of_non_section_fails(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write_yaml(tmp_path, merged({"seed": 0})), ["seed.x=1"])
    assert "seed" in str(e.value) and "not a section" in str(e.value)
    # `seed` absent from the file: still a clear error naming `seed`
    with pytest.raises(ConfigError) as e:
        load_config(write_yaml(tmp_path, MINIMAL), ["seed.x=1"])
    assert "seed" in str(e.value)


def test_override_without_equals_fails(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(write_yaml(tmp_path, MINIMAL), ["distill.alpha"])


def test_malformed_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("proxy: {tiny: {}\nstudent: [\n")
    with pytest.raises(ConfigError):
        load_config(path)


def test_fingerprint_stable_and_order_insensitive(tmp_path):
    a = {"x": 1, "y": {"p": [1, 2], "q": "s"}}
    b = {"y": {"q": "s", "p": [1, 2]}, "x": 1}
    assert fingerprint(a) == fingerprint(a)
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a, "extra") == fingerprint(b, "extra")
    h = fingerprint(a)
    assert len(h) == 16 and all(c in "0123456789abcdef" for c in h)


def test_fingerprint_changes_with_values(tmp_path):
    a = {"x": 1, "y": {"p": [1, 2]}}
    assert fingerprint(a) != fingerprint({"x": 2, "y": {"p": [1, 2]}})
    assert fingerprint(a) != fingerprint({"x": 1, "y": {"p": [2, 1]}})
    assert fingerprint(a) != fingerprint(a, "more")
    assert fingerprint("a", "b") != fingerprint("b", "a")


def test_fingerprint_of_configs(tmp_path):
    path = write_yaml(tmp_path, MINIMAL)
    c1, c2 = load_config(path), load_config(path)
    assert fingerprint(c1) == fingerprint(c2)
    # same config written with keys in another order
    path2 = tmp_path / "reordered.yaml"
    path2.write_text("student:\n  tiny: {}\nproxy:\n  tiny: {}\n")
    assert fingerprint(load_config(path2)) == fingerprint(c1)
    assert fingerprint(load_config(path, ["distill.alpha=1"])) != fingerprint(c1)
    assert fingerprint(c1.distill) != fingerprint(load_config(path, ["distill.alpha=1"]).distill)
    assert fingerprint(c1.teacher) == fingerprint(load_config(path, ["distill.alpha=1"]).teacher)


def test_a_missing_model_path_fails_at_load_naming_the_key_and_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key, path in (("proxy", str(tmp_path / "no-such-model")), ("student", "./typo"), ("student", "~/typo"),
                      ("proxy", "gpt2")):
        tree = {**MINIMAL, key: {"path": path}}
        with pytest.raises(ConfigError) as e:
            load_config(write_yaml(tmp_path, tree))
        line = next(ln.strip() for ln in str(e.value).splitlines() if ln.strip().startswith(f"{key}:"))
        assert repr(path) in line and "does not exist" in line, str(e.value)


def test_revision_pins_hub_ids_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write_yaml(tmp_path, {**MINIMAL, "proxy": {"path": "org/name", "revision": "v1"}}))
    assert (cfg.proxy.path, cfg.proxy.revision) == ("org/name", "v1")  # not looked for on disk
    (tmp_path / "local").mkdir()
    for model in ({"tiny": {}, "revision": "v1"}, {"path": "local", "revision": "v1"}):
        with pytest.raises(ConfigError, match="pins a hub id"):
            load_config(write_yaml(tmp_path, {**MINIMAL, "student": model}))


def test_revision_enters_the_fingerprint_of_every_stage_that_uses_the_model(tmp_path, monkeypatch):
    from proxykd import align, distill, evaluate, logits

    monkeypatch.chdir(tmp_path)
    hub = {"proxy": {"path": "org/proxy"}, "student": {"path": "org/student"}}
    base = load_config(write_yaml(tmp_path, hub))

    def hashes(cfg):
        a = align.config_hash(cfg, "answers")
        d = distill.config_hash(cfg, logits.config_hash(cfg, a))
        return {"align": a, "distill": d, "eval": evaluate.config_hash(cfg, d),
                "proxy-init": fingerprint(cfg.proxy, cfg.seed), "student-init": fingerprint(cfg.student, cfg.seed)}

    h0 = hashes(base)
    hp = hashes(load_config(write_yaml(tmp_path, hub), ["proxy.revision=v1"]))
    hs = hashes(load_config(write_yaml(tmp_path, hub), ["student.revision=v1"]))
    assert all(hp[k] != h0[k] for k in ("align", "distill", "eval", "proxy-init")) and hp["student-init"] == h0["student-init"]
    assert all(hs[k] != h0[k] for k in ("distill", "eval", "student-init"))
    assert (hs["align"], hs["proxy-init"]) == (h0["align"], h0["proxy-init"])
    # no revision: the dump (and so every existing run's fingerprints) is as before the key existed
    assert fingerprint(base.proxy) == fingerprint({"path": "org/proxy", "tiny": None, "dtype": "float32"})


def test_default_config_validates():
    cfg = load_config(REPO / "configs" / "default.yaml")
    assert cfg.proxy.tiny is not None and cfg.student.tiny is not None
    assert cfg.teacher.base_url is None
    assert cfg.data.source == "reasoning_gym" and cfg.data.tasks
    total = cfg.data.split.warmup + cfg.data.split.proxy + cfg.data.split.student
    assert total == pytest.approx(1.0)
    for spec in (cfg.proxy.tiny, cfg.student.tiny):
        assert spec.hidden_size % spec.num_heads == 0
    # the embedded default can be overridden like any other file
    assert load_config(REPO / "configs" / "default.yaml", ["distill.alpha=0"]).distill.alpha == 0.0


def _walk_keys(tree: dict, model_cls, prefix=""):
    """Every dotted key of `tree`, checked against the pydantic model it lands in."""
    from typing import get_args

    from pydantic import BaseModel

    for key, value in tree.items():
        assert key in model_cls.model_fields, f"{prefix}{key}: not a config key"
        ann = model_cls.model_fields[key].annotation
        sub = next((a for a in (ann, *get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if isinstance(value, dict) and sub is not None:
            _walk_keys(value, sub, f"{prefix}{key}.")


def test_paper_config_loads_sets_only_real_keys_and_its_splits_and_resources_add_up():
    path = REPO / "configs" / "paper.yaml"
    cfg = load_config(path)
    _walk_keys(yaml.safe_load(path.read_text()), RunConfig)
    # the paper's setting (arXiv 2401.07013): split 10/45/45, top-10, α = 100, 1 epoch, lr 1e-5 constant,
    # max length 1024, LoRA student
    s = cfg.data.split
    assert (s.warmup, s.proxy, s.student) == (0.1, 0.45, 0.45) and s.warmup + s.proxy + s.student == pytest.approx(1)
    assert cfg.data.eval_fraction + cfg.data.dev_fraction < 1
    assert cfg.logits.top_k == 10 and cfg.distill.alpha == 100 and cfg.distill.sample_weighting
    t = cfg.distill.train
    assert (t.epochs, t.lr, t.lr_schedule, t.lora is not None) == (1, 1e-5, "constant", True)
    assert cfg.logits.max_length == cfg.align.max_length == cfg.teacher.max_tokens == 1024
    # resources against the GPU node types of the AWS cluster launcher config it is meant for
    cluster = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())["available_node_types"]
    gpu_types = [t for t in cluster.values() if t.get("resources", {}).get("GPU")]
    per_node = max(t["resources"]["GPU"] for t in gpu_types)
    total = sum(t["resources"]["GPU"] * t["max_workers"] for t in gpu_types)
    r = cfg.resources
    assert r.use_gpu and r.vllm_gpus_per_actor == int(r.vllm_gpus_per_actor) > 0
    assert r.vllm_gpus_per_actor <= per_node, "a tensor-parallel vLLM engine must fit one node"
    assert 64 % r.vllm_gpus_per_actor == 0, "Llama-2-70B's 64 attention heads split evenly over tensor-parallel GPUs"
    assert r.vllm_actors * r.vllm_gpus_per_actor <= total and r.train_workers <= total
    assert r.vllm_cpus_per_actor <= min(t["resources"]["CPU"] for t in gpu_types)
    assert cfg.teacher.max_cost and cfg.teacher.price_per_million_completion_tokens > 0


def test_every_shipped_config_loads():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        _walk_keys(yaml.safe_load(path.read_text()), RunConfig)
        assert cfg.run_dir


def _leaf_keys(model_cls, prefix=""):
    """(dotted key, field) of every scalar key under a pydantic model class, nested models opened."""
    from typing import get_args

    from pydantic import BaseModel

    for name, field in model_cls.model_fields.items():
        sub = [a for a in (field.annotation, *get_args(field.annotation)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if sub and field.default is not None:
            yield from _leaf_keys(sub[0], f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def _changed(field, value):
    """Another valid value for a scalar key (None when there is no obvious one)."""
    from typing import Literal, get_args, get_origin

    choices = [a for a in (field.annotation, *get_args(field.annotation)) if get_origin(a) is Literal]
    if choices:
        return next((c for c in get_args(choices[0]) if c != value), None)
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1 if not isinstance(value, float) or value < 0.5 else value / 2
    if value is None:
        types = get_args(field.annotation)
        return 3 if int in types else 0.25 if float in types else None
    if isinstance(value, str):
        return value + "-x"
    return None


def test_operational_keys_never_change_a_stage_fingerprint_and_the_others_do(tmp_path):
    """One rule for every stage (config.operational): each key marked operational in the schema,
    changed, leaves every stage's fingerprint as it was; each other key of a stage's own slice
    changes that stage's fingerprint."""
    from pydantic import ValidationError

    from proxykd import align, distill, evaluate, logits, teacher
    from proxykd.config import is_operational

    def hashes(cfg):
        t = teacher.config_hash(cfg.teacher, "prompts")
        a = align.config_hash(cfg, "answers")
        lg = logits.config_hash(cfg, a)
        d = distill.config_hash(cfg, lg)
        return {"teacher": t, "align": a, "logits": lg, "distill": d, "eval": evaluate.config_hash(cfg, d)}

    slices = {"teacher": "teacher.", "align": "align.", "logits": "logits.", "distill": "distill.", "eval": "eval."}
    base_tree = {**MINIMAL, "teacher": {"base_url": "http://127.0.0.1:1/v1", "price_per_million_prompt_tokens": 1.0}}
    base = RunConfig.model_validate(base_tree)
    h0 = hashes(base)
    seen_operational = 0
    for key, field in _leaf_keys(RunConfig):
        stage = next((s for s, p in slices.items() if key.startswith(p)), None)
        if stage is None:
            continue
        parent = base
        for part in key.split(".")[:-1]:
            parent = getattr(parent, part)
        new = _changed(field, getattr(parent, key.split(".")[-1]))
        if new is None:
            continue
        try:
            cfg = RunConfig.model_validate(apply_overrides(copy.deepcopy(base_tree), [f"{key}={json.dumps(new)}"]))
        except ValidationError:  # a value the key's own validation refuses: not a change to test
            continue
        if is_operational(field):
            seen_operational += 1
            assert hashes(cfg) == h0, f"{key} is operational but changed a fingerprint"
        else:
            assert hashes(cfg)[stage] != h0[stage], f"{key} is not operational but left the {stage} fingerprint as it was"
    assert seen_operational >= 20  # the teacher's limits, retries, prices, batch knobs; checkpoints; batch sizes
