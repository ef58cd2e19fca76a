"""Autoscaling, simulated (issue 15.6): a fake multi-node Ray cluster whose autoscaler starts and
stops worker "nodes" (local processes) by demand, with worker types shaped like cluster/aws.yaml's,
zero workers at the start and a CPU-only head (CPU 0, as in aws.yaml). A job is submitted with
`proxykd submit`, and the timeline is recorded: nodes added while stages run, removed after the
idle timeout, the job finishing.

    python benchmarks/autoscale_timeline.py [--workload shaped|pipeline] [--idle-timeout-s 20]

Workloads:
- `shaped` (default, ~2-3 min): the job (`proxykd submit --command ...`: a `python -m` of this file's
  `stages` entry) runs three stages through the pipeline's own Ray request builders, on a config
  with per-stage resources: a Ray Data actor pool with `teacher.actor_ray_args` (CPU only), a Ray
  Data actor pool with `vllm_actors.map_kwargs` (`resources.vllm.accelerator_type: L40S`), and a
  Ray Train trainer (TorchTrainer's base, DataParallelTrainer) with `training.scaling_kwargs` (`resources.train.accelerator_type: L40S`).
  Each stage's actors sleep instead of calling an API or running vLLM/torch: the demand and its
  timing are the pipeline's, the work is not.
- `pipeline` (~7 min on 2 cores): the real pipeline (`proxykd submit ... run`) on a tiny config
  (local teacher, tiny models, vLLM on CPU) with the same per-stage resources.

The GPU worker types have no GPU here (a 2-core CPU machine): they advertise
`accelerator_type:<X>` like aws.yaml's, and the GPU stages ask for that instead of a GPU
(`num_gpus: 0`), so vLLM and training run on CPU on a "GPU" node. Node sizes are scaled down
(2 CPUs each) and the idle timeout is seconds instead of aws.yaml's 10 minutes.

Ray's `ray.cluster_utils.AutoscalingCluster` is not used: its start() and shutdown() run `ray stop
--force` (which stops every Ray on the machine), and in the installed wheel it cannot build its
config (ray/autoscaler/_private/fake_multi_node/example.yaml is not shipped). The same fake
provider (`FakeMultiNodeProvider`) is started here through `ray start --head
--autoscaling-config=...` with `RAY_FAKE_CLUSTER=1` (what AutoscalingCluster does), as an
`external` provider so the missing defaults file is not needed, on free ports, in its own process
group, stopped by signal.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_types(launcher: Path = REPO / "cluster" / "aws.yaml", cpus: int = 2, max_workers: int = 2) -> dict:
    """aws.yaml's worker types, scaled down: the same names and resource keys (CPU, GPU,
    accelerator_type:X), `cpus` CPUs each, no GPU (this machine has none), at most `max_workers`."""
    out = {}
    doc = yaml.safe_load(launcher.read_text())
    for name, t in doc["available_node_types"].items():
        if name == doc["head_node_type"]:
            continue
        res = {"CPU": cpus, "object_store_memory": 200 * 2**20}
        res.update({k: 1 for k in t["resources"] if k.startswith("accelerator_type:")})
        out[name] = {"resources": res, "node_config": {}, "min_workers": 0,
                     "max_workers": min(max_workers, t["max_workers"])}
    return out


def fake_config(types: dict, gcs_address: str, idle_timeout_s: float, v2: bool) -> dict:
    provider = {"type": "external",
                "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                "gcs_address": gcs_address, "use_node_id_as_ip": True, "disable_node_updaters": True,
                "disable_launch_config_check": True}
    if v2:
        provider.update(launch_multiple=True, head_node_id=FAKE_HEAD_NODE_ID)
    return {"cluster_name": "proxykd-fake", "max_workers": sum(t["max_workers"] for t in types.values()),
            "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_s / 60, "provider": provider,
            # (the fake provider names its head node type so)
            "available_node_types": {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {},
                                                          "max_workers": 0}, **types},
            "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "initialization_commands": [],
            "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
            "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
            "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
            "rsync_filter": []}


class FakeCluster:
    """`ray start --head --autoscaling-config` with the fake provider, on free ports, in
    its own process group; the worker nodes are processes the head's autoscaler starts."""

    def __init__(self, config: dict, port: int, v2: bool, log: Path):
        self.config, self.port, self.v2, self.log = config, port, v2, log
        self.dash, self.agent = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dash}"
        self.proc = None

    def __enter__(self):
        cfg = Path(tempfile.mkdtemp(prefix="proxykd-fake-")) / "autoscaling.yaml"
        cfg.write_text(json.dumps(self.config))
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled",
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                    "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1"})
        if self.v2:
            env.update({"RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                        "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID})
        # Not --block: `ray start --block` kills the whole head when one of its processes dies, and
        # under load its Ray Client server gives up waiting (30 s) for the head's node to register.
        # The processes stay in this new session's process group, which __exit__ signals.
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
             "--port", str(self.port), "--num-cpus", "0", "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(self.dash), "--dashboard-agent-listen-port", str(self.agent),
             "--ray-client-server-port", str(free_port()), f"--autoscaling-config={cfg}", "--disable-usage-stats"],
            env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.pgid = self.proc.pid
        if self.proc.wait(timeout=300) != 0:
            self.__exit__()
            raise RuntimeError(f"ray start --head failed; see {self.log}")
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{self.address}/api/version", timeout=2)
                return self
            except OSError:
                if time.time() > deadline:
                    self.__exit__()
                    raise RuntimeError("the head did not come up in 180 s") from None
                time.sleep(1)

    def __exit__(self, *exc):
        """SIGTERM to every process of the cluster (its own process group: nothing else on the
        machine), SIGKILL to what is left after 5 s (the GCS server and the monitor ignore SIGTERM)."""
        for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                return
            deadline = time.time() + wait_s
            while time.time() < deadline:
                try:
                    os.killpg(self.pgid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.5)


def node_kind(resources: dict, types: dict) -> str:
    for name, t in types.items():
        accel = [k for k in t["resources"] if k.startswith("accelerator_type:")]
        if accel and all(k in resources for k in accel):
            return name
    plain = [n for n, t in types.items() if not any(k.startswith("accelerator_type:") for k in t["resources"])]
    return plain[0] if plain and resources.get("CPU") else "head"


def alive_workers(address: str, types: dict) -> dict[str, str]:
    """{node id: type} of the alive worker nodes (from the dashboard's state API)."""
    from ray.util.state import list_nodes

    out = {}
    for n in list_nodes(address=address, limit=1000, raise_on_missing_output=False, timeout=10):
        if n.state == "ALIVE" and not n.is_head_node:
            out[n.node_id] = node_kind(n.resources_total or {}, types)
    return out


STAGE_MARK = "proxykd-stage "


# ------------------------------------------------------------------ the shaped stages (the job)


def stages(config_path: str, seconds: float) -> None:
    """The job's driver: three stages with the pipeline's own Ray requests, built from the config's
    per-stage resources; each actor sleeps `seconds` per batch instead of working."""
    import ray
    import ray.data

    from proxykd.config import load_config
    from proxykd.teacher import actor_ray_args
    from proxykd.training import scaling_kwargs
    from proxykd.vllm_actors import map_kwargs

    cfg = load_config(config_path)
    ray.init()

    def mark(what):
        print(f"{STAGE_MARK}{time.time():.3f} {what}", flush=True)

    class Sleeper:
        def __call__(self, batch):
            time.sleep(seconds)
            return batch

    mark("teacher start")
    ds = ray.data.range(cfg.teacher.num_actors * 2, override_num_blocks=cfg.teacher.num_actors * 2)
    ds.map_batches(Sleeper, batch_size=1, compute=ray.data.ActorPoolStrategy(size=cfg.teacher.num_actors),
                   **actor_ray_args(cfg.teacher)).materialize()
    mark("teacher end")
    mark("logits start")
    kw = map_kwargs(cfg.resources, batch_size=1)
    kw.pop("batch_format")
    n = cfg.resources.vllm_actors * 2
    ray.data.range(n, override_num_blocks=n).map_batches(Sleeper, **kw).materialize()
    mark("logits end")
    mark("distill start")
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    def loop(_):
        time.sleep(seconds)

    # TorchTrainer's own base class: the same worker group and placement group, without importing
    # torch in the driver (which crashed once here with "oneMKL FATAL ERROR: Cannot load libtorch_cpu.so").
    DataParallelTrainer(loop, scaling_config=ScalingConfig(**scaling_kwargs(cfg.resources)),
                        run_config=RunConfig(name="shaped", storage_path=tempfile.mkdtemp(prefix="proxykd-train-"))).fit()
    mark("distill end")


# -------------------------------------------------------------------------------- the benchmark


def per_stage_resources(accelerator: str) -> dict:
    return {"teacher": {"num_cpus": 1},
            "vllm": {"num_cpus": 1, "num_gpus": 0, "accelerator_type": accelerator},
            "train": {"num_cpus": 1, "num_gpus": 0, "accelerator_type": accelerator},
            "vllm_actors": 1, "train_workers": 2}


def write_config(root: Path, workload: str, accelerator: str) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import tiny_config

    tree = tiny_config(root / "run", resources=per_stage_resources(accelerator),
                       teacher={"num_actors": 2, "max_tokens": 32, "max_retries": 0, "timeout_s": 10})
    path = root / f"{workload}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=("shaped", "pipeline"), default="shaped")
    ap.add_argument("--idle-timeout-s", type=float, default=20.0)
    ap.add_argument("--stage-seconds", type=float, default=15.0, help="shaped: each batch's sleep")
    ap.add_argument("--autoscaler", choices=("v1", "v2"), default="v2")
    ap.add_argument("--accelerator", default="L40S", help="the GPU type the GPU stages ask for")
    ap.add_argument("--timeout-s", type=float, default=1800)
    ap.add_argument("--json", default=None, help="also write the timeline here")
    args = ap.parse_args()

    from proxykd import jobs

    types = worker_types()
    root = Path(tempfile.mkdtemp(prefix="proxykd-autoscale-"))
    port = free_port()
    config = fake_config(types, f"127.0.0.1:{port}", args.idle_timeout_s, args.autoscaler == "v2")
    run_config = write_config(root, args.workload, args.accelerator)
    events: list[tuple[float, str]] = []
    t0 = time.time()

    def event(what: str, at: float | None = None):
        at = time.time() if at is None else at
        events.append((at - t0, what))
        print(f"{at - t0:7.1f} s  {what}", flush=True)

    print(f"worker types: {json.dumps(types)}\nidle timeout {args.idle_timeout_s:g} s, autoscaler {args.autoscaler}, "
          f"workload {args.workload}, logs under {root}", flush=True)
    with FakeCluster(config, port, args.autoscaler == "v2", root / "head.log") as cluster:
        event(f"head up ({cluster.address}), 0 workers")
        os.environ.pop("RAY_ADDRESS", None)
        os.environ["RAY_AUTH_MODE"] = "disabled"
        if args.workload == "shaped":
            job_id = jobs.client(cluster.address).submit_job(
                entrypoint=f"python benchmarks/autoscale_timeline.py --stages {run_config.name} "
                           f"--stage-seconds {args.stage_seconds}",
                runtime_env={"working_dir": str(REPO),
                             "env_vars": {"PROXYKD_AUTOSCALE_CONFIG": str(run_config)}})
        else:
            job_id = jobs.submit(run_config, cluster.address)
        event(f"job submitted: {job_id}")
        seen: dict[str, str] = {}
        status, ended, marks_done = None, None, set()
        deadline = time.time() + args.timeout_s
        while time.time() < deadline:
            try:
                now = alive_workers(cluster.address, types)
            except Exception as e:  # noqa: BLE001 - the state API under load: try again
                print(f"(state API: {e})", flush=True)
                time.sleep(1)
                continue
            for nid, kind in now.items():
                if nid not in seen:
                    event(f"+ node {kind} ({nid[-5:]}); {len(now)} worker(s)")
            for nid, kind in seen.items():
                if nid not in now:
                    event(f"- node {kind} ({nid[-5:]}); {len(now)} worker(s)")
            seen = now
            if ended is None:
                info = jobs.job_info(job_id, cluster.address)
                logs = jobs.job_logs(job_id, cluster.address)
                for line in logs.splitlines():
                    if line.startswith(STAGE_MARK) and line not in marks_done:
                        marks_done.add(line)
                        at, what = line[len(STAGE_MARK):].split(" ", 1)
                        event(f"stage {what}", float(at))
                if args.workload == "pipeline":
                    for s in jobs.run_status(root / "run")["stages"]:
                        key = f"stage {s['stage']} {s['state']}"
                        if s["state"] in ("running", "done") and key not in marks_done:
                            marks_done.add(key)
                            event(key)
                status = str(info.status.value)
                if status in jobs.TERMINAL:
                    ended = time.time()
                    event(f"job {status}")
                    (root / "job.log").write_text(logs)
            elif not now:
                event("all worker nodes removed")
                break
            time.sleep(1)
        else:
            event("timed out")
    events.sort()
    print("\n| t (s) | event |\n| ---: | --- |")
    for at, what in events:
        print(f"| {at:.0f} | {what} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"events": events, "types": types, "status": status,
                                               "idle_timeout_s": args.idle_timeout_s, "workload": args.workload}))
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--stages"]:
        p = argparse.ArgumentParser()
        p.add_argument("--stages")
        p.add_argument("--stage-seconds", type=float, default=15.0)
        a = p.parse_args()
        stages(os.environ.get("PROXYKD_AUTOSCALE_CONFIG", a.stages), a.stage_seconds)
        sys.exit(0)
    sys.exit(main())
