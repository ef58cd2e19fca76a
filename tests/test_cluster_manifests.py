"""The teacher key stays where the job's driver runs (issue 15.7): in every manifest under cluster/
it is a Kubernetes Secret reference on the head pod only, never on a worker group, never a literal
value, never in a runtime env; the launcher configs put it on no node at all (the driver reads a
file `ray rsync-up` put on the head); the READMEs never pass it with --runtime-env-json."""

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
TEACHER_SECRET = "proxykd-teacher"  # the Kubernetes Secret holding the key (cluster/README.md)


def key_names() -> set[str]:
    """The teacher key's environment variable: the default and any name a shipped config uses."""
    from proxykd.config import TeacherConfig

    names = {TeacherConfig().api_key_env}
    for path in (REPO / "configs").glob("*.yaml"):
        teacher = (yaml.safe_load(path.read_text()) or {}).get("teacher") or {}
        if teacher.get("api_key_env"):
            names.add(teacher["api_key_env"])
    return names


def _walk(node, path=()):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, (*path, i))


def _role(path) -> str:
    if "headGroupSpec" in path:
        return "head"
    if "submitterPodTemplate" in path:
        return "submitter"
    if "workerGroupSpecs" in path:
        return "worker"
    return "other"


def _kube_problems(name: str, doc: dict, keys: set[str]) -> list[str]:
    problems, on_head = [], False
    for path, node in _walk(doc):
        if not (isinstance(node, dict) and isinstance(node.get("containers"), list)):
            continue
        role = _role(path)
        for c in node["containers"] + (node.get("initContainers") or []):
            where = f"{name}: {role} container {c.get('name')}"
            for e in c.get("env") or []:
                ref = ((e.get("valueFrom") or {}).get("secretKeyRef") or {})
                if e.get("name") in keys or ref.get("name") == TEACHER_SECRET:
                    if role not in ("head", "submitter"):
                        problems.append(f"{where}: the teacher key ({e.get('name')}) on a {role}")
                    if "value" in e or not ref:
                        problems.append(f"{where}: {e.get('name')} is not a secretKeyRef")
                    on_head |= role == "head" and bool(ref)
            for e in c.get("envFrom") or []:
                if (e.get("secretRef") or {}).get("name") == TEACHER_SECRET and role not in ("head", "submitter"):
                    problems.append(f"{where}: envFrom the teacher Secret on a {role}")
    # The key's name may appear as a head container's env entry name, nowhere else (runtime envs,
    # entrypoints, serve configs, commands).
    for path, node in _walk(doc):
        if isinstance(node, str) and any(k in node for k in keys):
            if not (path[-1:] == ("name",) and "env" in path and _role(path) in ("head", "submitter")):
                problems.append(f"{name}: the key's name at {'.'.join(map(str, path))}")
    kind = doc.get("kind")
    if kind == "RayJob":
        spec = doc.get("spec") or {}
        for field in ("entrypointNumCpus", "entrypointNumGpus", "entrypointMemory", "entrypointResources"):
            if field in spec:  # the driver would then go wherever those fit, maybe a worker without the key
                problems.append(f"{name}: {field} set, the driver may leave the head")
    if kind in ("RayCluster", "RayJob") and not on_head:
        problems.append(f"{name}: {kind} runs the pipeline but its head pod has no teacher key Secret")
    if kind == "RayService" and on_head:
        problems.append(f"{name}: serving needs no teacher key")
    return problems


def _launcher_problems(name: str, doc: dict, keys: set[str]) -> list[str]:
    """A launcher config puts the key on no node: it names it nowhere but the head's own commands,
    and mounts no secrets file (file_mounts reach every node)."""
    problems = []
    for path, node in _walk(doc):
        texts = [node] if isinstance(node, str) else list(node) if isinstance(node, dict) else []
        for text in texts:
            if not isinstance(text, str):
                continue
            if any(k in text for k in keys) and path[:1] not in (("head_setup_commands",), ("head_start_ray_commands",)):
                problems.append(f"{name}: the key's name at {'.'.join(map(str, path)) or '(top)'}")
            if path[:1] == ("file_mounts",) and re.search(r"secret|\.env\b|\.proxykd", text):
                problems.append(f"{name}: file_mounts (every node) carries {text}")
    return problems


def manifest_problems(root: Path, keys: set[str]) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict):
                continue
            name = str(path.relative_to(root))
            if "available_node_types" in doc:
                problems += _launcher_problems(name, doc, keys)
            elif str(doc.get("apiVersion", "")).startswith("ray.io/"):
                problems += _kube_problems(name, doc, keys)
    for path in sorted(root.glob("Dockerfile*")):
        for line in path.read_text().splitlines():
            if re.match(r"\s*(ENV|ARG)\b", line) and any(k in line for k in keys):
                problems.append(f"{path.name}: bakes the key into the image: {line.strip()}")
    return problems


def doc_problems(markdown: str, keys: set[str], name: str) -> list[str]:
    """Commands in fenced code blocks never pass the key through a job's runtime env."""
    problems = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", markdown, re.S):
        command = block.replace("\\\n", " ")
        for line in command.splitlines():
            if any(k in line for k in keys) and re.search(r"runtime-env|runtime_env|env_vars", line):
                problems.append(f"{name}: passes the key in a runtime env: {line.strip()[:120]}")
    return problems


def test_shipped_manifests_keep_the_teacher_key_on_the_head():
    keys = key_names()
    assert "OPENAI_API_KEY" in keys
    assert manifest_problems(CLUSTER, keys) == []
    kinds = {d.get("kind") for p in CLUSTER.rglob("*.yaml") for d in yaml.safe_load_all(p.read_text())
             if isinstance(d, dict)}
    assert {"RayCluster", "RayJob", "RayService"} <= kinds  # the checks above looked at each kind
    assert len([p for p in CLUSTER.glob("*.yaml") if "available_node_types" in p.read_text()]) >= 2


def test_readmes_never_pass_the_key_in_a_runtime_env():
    keys = key_names()
    for path in (REPO / "README.md", CLUSTER / "README.md"):
        assert doc_problems(path.read_text(), keys, path.name) == []


def test_the_docker_build_context_leaves_secrets_files_out():
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert "**/secrets.env" in ignore and "**/.env" in ignore


BAD_RAYCLUSTER = """
apiVersion: ray.io/v1
kind: RayCluster
metadata: {name: bad}
spec:
  headGroupSpec:
    template:
      spec:
        containers:
          - name: ray-head
            env:
              - {name: OPENAI_API_KEY, value: sk-literal}
  workerGroupSpecs:
    - groupName: gpu
      template:
        spec:
          containers:
            - name: ray-worker
              env:
                - name: OPENAI_API_KEY
                  valueFrom: {secretKeyRef: {name: proxykd-teacher, key: api-key}}
              envFrom:
                - secretRef: {name: proxykd-teacher}
---
apiVersion: ray.io/v1
kind: RayJob
metadata: {name: bad-job}
spec:
  entrypoint: python jobs/pipeline.py
  entrypointNumCpus: 1
  runtimeEnvYAML: |
    env_vars: {OPENAI_API_KEY: sk-literal}
  rayClusterSpec:
    headGroupSpec:
      template: {spec: {containers: [{name: ray-head}]}}
"""

BAD_LAUNCHER = """
cluster_name: bad
available_node_types: {head: {resources: {CPU: 0}}}
docker:
  run_options: ["--env OPENAI_API_KEY=$OPENAI_API_KEY"]
file_mounts:
  /home/ray/.proxykd/secrets.env: ~/.proxykd/secrets.env
worker_setup_commands: ["echo OPENAI_API_KEY=x >> ~/.bashrc"]
head_start_ray_commands: ["export OPENAI_API_KEY=$(cat ~/.proxykd/key); ray start --head"]
"""


def test_the_checks_catch_a_key_on_workers_a_literal_a_runtime_env_and_a_mount(tmp_path):
    """Each way the key can leak is found (so the tests above can fail)."""
    keys = {"OPENAI_API_KEY"}
    (tmp_path / "kuberay").mkdir()
    (tmp_path / "kuberay" / "bad.yaml").write_text(BAD_RAYCLUSTER)
    (tmp_path / "launcher.yaml").write_text(BAD_LAUNCHER)
    (tmp_path / "Dockerfile").write_text("FROM x\nENV OPENAI_API_KEY=sk-literal\n")
    problems = "\n".join(manifest_problems(tmp_path, keys))
    for expected in ("head container ray-head: OPENAI_API_KEY is not a secretKeyRef",
                     "worker container ray-worker: the teacher key (OPENAI_API_KEY) on a worker",
                     "envFrom the teacher Secret on a worker",
                     "bad.yaml: the key's name at spec.runtimeEnvYAML",
                     "entrypointNumCpus set",
                     "RayJob runs the pipeline but its head pod has no teacher key Secret",
                     "launcher.yaml: the key's name at docker.run_options.0",
                     "launcher.yaml: the key's name at worker_setup_commands.0",
                     "file_mounts (every node) carries /home/ray/.proxykd/secrets.env",
                     "Dockerfile: bakes the key"):
        assert expected in problems, expected
    assert "head_start_ray_commands" not in problems  # the head's own commands may name it
    md = ("```bash\nray job submit --address A \\\n  --runtime-env-json "
          "'{\"env_vars\": {\"OPENAI_API_KEY\": \"$OPENAI_API_KEY\"}}' -- python jobs/pipeline.py\n```\n")
    assert doc_problems(md, keys, "x.md")
    assert not doc_problems("Never pass OPENAI_API_KEY with --runtime-env-json.\n", keys, "x.md")  # prose


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_worker_pods_get_the_shared_hugging_face_cache_and_no_secret(name):
    doc = yaml.safe_load((CLUSTER / "kuberay" / name).read_text())
    workers = [n for p, n in _walk(doc) if isinstance(n, dict) and "containers" in n and _role(p) == "worker"]
    assert workers
    for pod in workers:
        for c in pod["containers"]:
            assert c["env"] == [{"name": "HF_HOME", "value": "/mnt/shared/hf"}]
