"""One YAML file describes a whole run; pydantic validates it before any work starts.

Every section forbids unknown keys, so a typo fails at load time with the key's dotted path.
`load_config(path, overrides=["distill.alpha=100"])` applies command-line overrides first.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def operational(default: Any = ..., **kwargs) -> Any:
    """A key that changes how a stage runs (parallelism, limits, retries, prices, checkpoints), never
    what it writes: left out of every stage's fingerprint (`artifact_view`), so changing it never
    redoes finished work. The one rule for every stage; the schema says which keys are which."""
    return Field(default, json_schema_extra={"operational": True}, **kwargs)


def is_operational(field) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("operational"))


class TinyModelSpec(_Strict):
    """A small Llama built offline from scratch (for laptops, tests and the embedded default)."""

    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(128, gt=0)
    max_position_embeddings: int = Field(512, gt=0)

    @model_validator(mode="after")
    def _head_dim(self):
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        # vLLM's CPU attention only supports these head sizes.
        if self.hidden_size // self.num_heads not in (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512):
            raise ValueError(
                f"head_dim = hidden_size/num_heads = {self.hidden_size // self.num_heads}; "
                "vLLM needs one of 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512"
            )
        return self


class ModelConfig(_Strict):
    """Either `path` (a Hugging Face folder or hub id) or `tiny` (built offline)."""

    path: Optional[str] = Field(
        None, description="a local Hugging Face folder (must exist, or be a `proxykd models` name built on first "
        "use) or a hub id `org/name` (only when no such local folder exists)")
    tiny: Optional[TinyModelSpec] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    revision: Optional[str] = Field(
        None, description="hub ids only: the branch, tag or commit to load (a commit hash pins it); enters the "
        "fingerprint of every stage that depends on this model. null: the hub's default branch")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.tiny is None):
            raise ValueError("give exactly one of `path` or `tiny`")
        return self

    @model_validator(mode="after")
    def _path_exists_or_hub_id(self):
        from proxykd.models import ModelPathError, model_source  # models imports this module

        try:
            source = model_source(self.path) if self.path is not None else "tiny"
        except ModelPathError as e:
            raise ValueError(str(e)) from None
        if self.revision is not None and source != "hub":
            what = "tiny" if source == "tiny" else f"the local path {self.path!r}"
            raise ValueError(f"`revision` pins a hub id, but this model is {what}")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        out = handler(self)
        if out.get("revision") is None:  # configs without one keep their stage fingerprints
            out.pop("revision", None)
        return out


class TaskConfig(_Strict):
    name: str
    size: int = Field(gt=0)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class SplitConfig(_Strict):
    """Fractions of the non-eval rows; the paper uses 10/45/45."""

    warmup: float = Field(0.1, ge=0, le=1)
    proxy: float = Field(0.45, ge=0, le=1)
    student: float = Field(0.45, ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self):
        total = self.warmup + self.proxy + self.student
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"warmup + proxy + student must sum to 1, got {total:g}")
        return self


class DataConfig(_Strict):
    """Prompts come from reasoning-gym tasks (with reference answers) or a JSONL/Parquet file
    with `id`, `messages` (or `prompt`) and optional `reference`, `task` and `metadata`. A file
    row's `task` must name a reasoning-gym dataset (its scorer then scores the row, isolated: see
    proxykd.scoring); rows without one are scored by exact match."""

    source: Literal["reasoning_gym", "file"] = "reasoning_gym"
    path: Optional[str] = None
    tasks: list[TaskConfig] = Field(default_factory=lambda: [TaskConfig(name="basic_arithmetic", size=200)])
    seed: int = 0
    system_prompt: Optional[str] = None
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    dev_fraction: float = Field(
        0.0, ge=0, lt=1, description="a dev split, neither trained on nor the eval split: `proxykd report` "
        "picks hyperparameters on it")
    split_by: Literal["id", "question"] = Field(
        "id", description="what the split hash reads: the row id, or the prompt text (identical questions "
        "then share a split, so train and eval items are disjoint by content)")
    split: SplitConfig = Field(default_factory=SplitConfig)

    @model_validator(mode="after")
    def _held_out_fractions(self):
        if self.eval_fraction + self.dev_fraction >= 1:
            raise ValueError("eval_fraction + dev_fraction must be below 1")
        return self

    @model_validator(mode="after")
    def _path_for_file(self):
        if self.source == "file" and not self.path:
            raise ValueError("data.path is required when data.source is 'file'")
        return self


class TeacherConfig(_Strict):
    """The black-box teacher. `base_url: null` starts proxykd's local teacher server, which answers
    from each prompt's reference (the stand-in when no API key is configured).

    What is bought (model, endpoint, sampling, n) decides the stored answers; everything else here
    (concurrency, limits, retries, prices, budget) is operational and never invalidates them."""

    base_url: Optional[str] = None
    local_host: Optional[str] = operational(
        None, description="where the local teacher (base_url null) listens; null: 127.0.0.1 on a local Ray, "
        "the driver node's cluster address when the run joins a cluster (the caller actors may run on any node)")
    model: str = "local-teacher"
    api_key_env: str = operational("OPENAI_API_KEY")
    endpoint: Literal["chat", "completions"] = Field(
        "chat", description="chat: /chat/completions with the messages; completions: /completions "
        "with the message contents joined by blank lines")
    n: int = Field(1, ge=1, le=128, description="samples per prompt, asked in one request")
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, gt=0)
    concurrency: int = operational(8, gt=0, description="in-flight requests per actor")
    num_actors: int = operational(1, gt=0)
    requests_per_minute: Optional[float] = operational(None, gt=0, description="run-wide, all actors together")
    tokens_per_minute: Optional[float] = operational(
        None, gt=0, description="run-wide; a request counts its estimated prompt tokens + max_tokens·n "
        "until its real usage is known")
    max_retries: int = operational(5, ge=0)
    backoff_s: float = operational(0.5, gt=0, description="first retry waits about this long, doubling")
    max_backoff_s: float = operational(30.0, gt=0)
    timeout_s: float = operational(60.0, gt=0)
    max_prompt_tokens: int = Field(
        16000, gt=0, description="prompts estimated longer (UTF-8 bytes / 4) are rejected before any call")
    price_per_million_prompt_tokens: float = operational(0.0, ge=0, description="USD, for the cost estimate")
    price_per_million_completion_tokens: float = operational(0.0, ge=0)
    max_cost: Optional[float] = operational(
        None, gt=0, description="USD over everything this stage folder bought; the stage stops cleanly "
        "when the next request could exceed it")
    max_total_tokens: Optional[int] = operational(None, gt=0, description="the same budget in tokens")
    progress_every_s: float = operational(10.0, gt=0)
    # Batch mode (proxykd/teacher_batch.py). Operational: the answers are the same requests, keyed alike.
    mode: Literal["online", "batch"] = operational(
        "online", description="online: requests sent as they go (Ray Data actors); batch: the provider's Batch "
        "API (JSONL files uploaded, answered within 24 h, at the batch price)")
    batch_max_requests: int = operational(50000, gt=0, description="requests per batch input file (OpenAI: 50,000)")
    batch_max_bytes: int = operational(200_000_000, gt=0, description="bytes per batch input file (OpenAI: 200 MB)")
    batch_max_in_flight: Optional[int] = operational(
        None, gt=0, description="batches submitted and not yet finished at once (null: no limit); a provider's "
        "enqueued-token limit fails batches beyond it")
    batch_poll_s: float = operational(30.0, gt=0, description="first wait between polls of the running batches; "
                                "it grows 1.5× per unchanged poll up to batch_max_poll_s")
    batch_max_poll_s: float = operational(600.0, gt=0)
    batch_discount: float = operational(
        0.5, gt=0, le=1, description="batch price = online price × this, for prices not given below")
    batch_price_per_million_prompt_tokens: Optional[float] = operational(None, ge=0, description="USD; null: discounted")
    batch_price_per_million_completion_tokens: Optional[float] = operational(None, ge=0, description="USD; null: discounted")

    @model_validator(mode="after")
    def _budget_needs_prices(self):
        # With both prices 0 every call costs $0 and the budget would never stop anything.
        batch_priced = self.mode == "batch" and (self.batch_price_per_million_prompt_tokens
                                                 or self.batch_price_per_million_completion_tokens)
        if self.max_cost is not None and not (self.price_per_million_prompt_tokens
                                              or self.price_per_million_completion_tokens or batch_priced):
            raise ValueError("teacher.max_cost needs the provider's prices: set "
                             "teacher.price_per_million_prompt_tokens and price_per_million_completion_tokens "
                             "(with both 0 every call costs $0 and the budget never stops the stage; in batch mode "
                             "the batch prices will do), "
                             "or budget in tokens with teacher.max_total_tokens")
        return self


class LoraConfig(_Strict):
    """Train LoRA adapters (peft) instead of all weights; the saved model has them merged in."""

    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class TrainConfig(_Strict):
    epochs: int = Field(1, gt=0)
    lr: float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0, description="linear warm-up to lr over the first optimizer steps")
    batch_size: int = Field(8, gt=0, description="rows per worker per micro-batch")
    grad_accum_steps: int = Field(1, gt=0, description="micro-batches per optimizer step")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    shuffle: bool = Field(True, description="a fresh permutation of the rows every epoch, from seed + epoch")
    seed: int = 0
    strategy: Literal["ddp", "fsdp"] = "ddp"
    bf16: Optional[bool] = Field(None, description="bf16 autocast; null: on GPU only")
    lora: Optional[LoraConfig] = None
    checkpoint_every_steps: int = operational(100, gt=0, description="and one at the end; the data position is "
                                        "exact at any step, so epoch ends need no checkpoint of their own")
    max_failures: int = operational(2, ge=0, description="worker-group restarts from the last checkpoint")

    @model_validator(mode="after")
    def _lora_not_fsdp(self):
        if self.lora is not None and self.strategy == "fsdp":
            raise ValueError("lora with strategy fsdp is not supported; LoRA trains few weights, use ddp")
        return self


class SamplingConfig(_Strict):
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(64, gt=0)


class AlignConfig(_Strict):
    """Warm-up SFT on D_w, then `rounds` of: proxy samples ŷ on D_p (vLLM), train NLL + β·DPO
    with the previous round's proxy as the reference."""

    rounds: int = Field(2, ge=0)
    rows_per_round: Optional[int] = Field(
        None, gt=0, description="D_p rows each round samples and trains on: null = all of them every round; "
        "N = N rows taken in turn from a seeded order of D_p, so rounds see different rows until it is used up")
    max_length: int = Field(1024, gt=0, description="prompt + response tokens; longer rows are rejected")
    beta: float = Field(0.1, gt=0)
    nll_weight: float = Field(1.0, ge=0)
    heldout_fraction: float = Field(
        0.1, ge=0, lt=1, description="of D_p, by a hash of id: never trained on, used to measure alignment "
        "(teacher log-likelihood and top-1 agreement) after the warm-up and every round")
    select: Literal["best_heldout", "last"] = Field(
        "best_heldout", description="the proxy the stage hands on (manifest `model`): best_heldout = the one "
        "of the warm-up and the rounds with the highest held-out teacher log-likelihood per token (a round "
        "that overshoots is skipped; every round is still reported); last = the last round's. With nothing "
        "held out, the last")
    warmup: TrainConfig = Field(default_factory=TrainConfig)
    dpo: TrainConfig = Field(default_factory=TrainConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)


class LogitsConfig(_Strict):
    """Also fixes the student's training rows: distillation reads exactly these sequences."""

    top_k: int = Field(10, gt=0)
    max_length: int = Field(1024, gt=0, description="prompt + response tokens (capped by the proxy's context)")
    overlong: Literal["reject", "truncate"] = Field(
        "reject", description="rows over max_length: reject (with id), or cut the response (prompt kept whole)"
    )
    logprob_dtype: Literal["float16", "float32"] = Field(
        "float16", description="stored top-k log-probs: float16 (2 bytes, relative rounding <= 2^-11) or float32 (as vLLM returns them)"
    )
    batch_size: int = operational(16, gt=0, description="rows per engine call (every row is scored alone)")


class DistillConfig(_Strict):
    """L = NLL + alpha · w · KL(π_proxy ‖ p_student) over the top-k support."""

    alpha: float = Field(100.0, ge=0)
    sample_weighting: bool = True
    divergence: Literal["forward", "reverse", "jsd"] = Field("forward", description="forward = the paper's KL(proxy‖student)")
    tail: Literal["tail_bucket", "renormalize"] = Field(
        "tail_bucket", description="mass outside the top-k: one extra bucket, or renormalise both over the top-k"
    )
    jsd_beta: float = Field(0.5, gt=0, lt=1)
    baseline: bool = Field(True, description="also train the alpha=0 (black-box KD) student for comparison")
    train: TrainConfig = Field(default_factory=TrainConfig)


class EvalConfig(_Strict):
    max_tokens: int = Field(64, gt=0)
    temperature: float = Field(0.0, ge=0)


class ReportConfig(_Strict):
    """`proxykd report`: every arm on the same data and budget (see proxykd/report.py)."""

    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="training seeds; the first "
                             "trains every arm, the others retrain black-box KD and full Proxy-KD")
    lrs: list[float] = Field(default_factory=lambda: [1e-4], min_length=1, description="learning-rate candidates, "
                             "picked on the dev split with black-box KD; every arm then trains at the choice")
    alphas: list[float] = Field(default_factory=lambda: [1.0], min_length=1, description="α candidates for Proxy-KD, "
                                "picked on the dev split with full Proxy-KD at the chosen lr; c and d use its choice")
    bootstrap_samples: int = Field(10000, gt=0, description="paired-bootstrap resamples of the eval items")

    @field_validator("lrs", "alphas")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(x <= 0 for x in v):
            raise ValueError("every candidate must be > 0")
        return v


class StageResources(_Strict):
    """What each actor or training worker of one stage asks Ray for: the demand a cluster's
    autoscaler sees (CPU node types for the teacher's HTTP calls, GPU types for vLLM and training).
    A null key takes the flat `resources` block's value, or the stage's default."""

    num_cpus: Optional[float] = operational(None, ge=0, description="CPUs per actor / worker")
    num_gpus: Optional[float] = operational(None, ge=0, description="GPUs per actor / worker (vLLM: >= 2 runs one "
                                            "tensor-parallel engine over them)")
    memory_gb: Optional[float] = operational(
        None, gt=0, description="Ray's `memory` resource per actor / worker, GiB: a node is picked that has it "
        "free (scheduling, not a limit)")
    accelerator_type: Optional[str] = operational(
        None, min_length=1, description="only nodes that advertise `accelerator_type:<this>` (e.g. L40S, A100, H100; "
        "every GPU type of cluster/*.yaml advertises its own)")

    def ray_args(self, cpus: float, gpus: float = 0) -> dict:
        """Ray Data `map_batches` / `ray.remote` keywords of one actor: this block's values, `cpus`
        and `gpus` where it has none; `memory` in bytes; `accelerator_type` only when set."""
        args = {"num_cpus": cpus if self.num_cpus is None else self.num_cpus,
                "num_gpus": gpus if self.num_gpus is None else self.num_gpus}
        if self.memory_gb is not None:
            args["memory"] = int(self.memory_gb * 2**30)
        if self.accelerator_type is not None:
            args["accelerator_type"] = self.accelerator_type
        return args


def _stage_resources(what: str):
    return Field(default_factory=StageResources, json_schema_extra={"operational": True},
                 description=f"{what}; null keys take the flat keys above")


class ResourcesConfig(_Strict):
    """How the stages run on Ray; nothing here changes an artifact, so every key is operational.
    The flat keys serve every stage; `teacher`, `vllm` and `train` set one stage's request."""

    train_workers: int = operational(1, gt=0)
    use_gpu: bool = operational(False)
    vllm_actors: int = operational(1, gt=0)
    vllm_gpus_per_actor: float = operational(0, ge=0)
    vllm_cpus_per_actor: float = operational(1, ge=0)
    vllm_kv_cache_gb: int = operational(1, gt=0, description="CPU KV-cache size (VLLM_CPU_KVCACHE_SPACE)")
    vllm_gpu_memory_utilization: float = operational(0.85, gt=0, le=1)
    vllm_enforce_eager: Optional[bool] = operational(
        None, description="vLLM without graph capture/compilation: null = on CPU only, where the compile "
        "warm-up costs each engine start about 20 s and buys little")
    vllm_in_process: Optional[bool] = operational(
        None, description="run vLLM's engine core and its one worker inside the actor's process (no engine-core "
        "and worker processes): null = on CPU only, where those two processes, each importing vLLM and torch, "
        "cost every engine start 15 s or more; on GPU the engine-core process overlaps scheduling with the "
        "model. Ignored with tensor parallelism (vllm_gpus_per_actor >= 2)")
    teacher: StageResources = _stage_resources("each teacher actor (async HTTP calls; default 0.5 CPU)")
    vllm: StageResources = _stage_resources("each vLLM actor: align's sampler, the logits scorer, eval "
                                            "(defaults vllm_cpus_per_actor, vllm_gpus_per_actor)")
    train: StageResources = _stage_resources("each Ray Train worker of align and distill (defaults 1 CPU, and "
                                             "1 GPU with use_gpu)")

    @property
    def vllm_gpus(self) -> float:
        """GPUs per vLLM actor: `vllm.num_gpus`, else `vllm_gpus_per_actor`."""
        return self.vllm_gpus_per_actor if self.vllm.num_gpus is None else self.vllm.num_gpus

    @property
    def vllm_cpus(self) -> float:
        return self.vllm_cpus_per_actor if self.vllm.num_cpus is None else self.vllm.num_cpus

    @property
    def train_gpus(self) -> float:
        """GPUs per training worker: `train.num_gpus`, else 1 with `use_gpu`, else 0."""
        return (1.0 if self.use_gpu else 0.0) if self.train.num_gpus is None else self.train.num_gpus

    @property
    def train_cpus(self) -> float:
        return 1.0 if self.train.num_cpus is None else self.train.num_cpus


class RayConfig(_Strict):
    address: Optional[str] = Field(None, description="null: start a local Ray; 'auto': join a running cluster")
    num_cpus: Optional[int] = Field(4, description="logical CPUs for a local Ray (may exceed physical)")


class ServeAutoscalingConfig(_Strict):
    """Ray Serve autoscaling of each served model's replicas (one vLLM engine each), by the requests
    in flight per replica."""

    min_replicas: int = operational(1, ge=0, description="replicas kept when idle (0: scale to zero; the "
                                    "first request then waits for an engine to start)")
    max_replicas: int = operational(2, ge=1, description="replicas at most")
    target_ongoing_requests: float = operational(
        2.0, gt=0, description="requests in flight per replica the autoscaler aims at: more adds a replica")
    upscale_delay_s: float = operational(10.0, ge=0, description="load above target this long adds replicas")
    downscale_delay_s: float = operational(60.0, ge=0, description="load below target this long removes replicas")

    @model_validator(mode="after")
    def _min_below_max(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        return self


class ServeConfig(_Strict):
    """`proxykd serve CONFIG_OR_RUN_DIR`: the run's students (and proxy) over an OpenAI-compatible
    API behind optional API keys and request limits (proxykd/serving.py). Serving writes no
    artifacts, so every key here is operational."""

    host: str = operational("127.0.0.1", description="interface to listen on (0.0.0.0: all)")
    port: int = operational(8000, gt=0, lt=65536)
    model_name: str = operational("proxykd-student", min_length=1, description="the name clients send for the "
                                  "Proxy-KD student (distill/model)")
    baseline_name: Optional[str] = operational(
        None, min_length=1, description="also serve the α = 0 (black-box KD) student (distill/baseline/model) "
        "under this name, for A/B through one endpoint; null: not served")
    proxy_name: Optional[str] = operational(
        None, min_length=1, description="also serve the aligned proxy (align manifest `model`) under this name; "
        "null: not served")
    api_key_env: Optional[str] = operational(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="name of the environment variable holding the "
        "accepted API keys (comma-separated); every route then needs `Authorization: Bearer KEY`. The key "
        "itself never goes in a config. null: no auth (loopback use)")
    num_replicas: int = operational(1, ge=1, description="replicas per model when `autoscaling` is null")
    autoscaling: Optional[ServeAutoscalingConfig] = operational(
        None, description="replicas per model between min and max by load; null: a fixed num_replicas")
    max_ongoing_requests: int = operational(
        16, ge=1, description="requests one replica runs at once; more wait in Serve's queue")
    max_tokens: int = operational(
        512, ge=1, description="largest max_tokens a request may ask for (400 above it); requests without one "
        "get this, and the context length caps both")
    max_n: int = operational(4, ge=1, description="largest n (choices per request); 400 above it")
    max_body_bytes: int = operational(1_000_000, ge=1024, description="largest request body; 400 above it")
    request_timeout_s: float = operational(
        120.0, gt=0, description="a request running longer is stopped (408, streams end with an error event)")
    max_model_len: Optional[int] = operational(
        None, gt=0, description="context length in tokens (prompt + output; longer prompts get 400); null: the "
        "model's own")
    warmup: bool = operational(True, description="each replica answers a short request before it reports "
                               "ready, so the first client request runs at normal speed")
    ingress_resources: dict[str, float] = operational(
        default_factory=dict, description="Ray custom resources the ingress (the replica that checks API keys) "
        "asks for, e.g. {proxykd_ingress: 1} offered by the head node only: the key's Secret is then needed "
        "on the head alone (cluster/kuberay/rayservice.yaml)")

    @model_validator(mode="after")
    def _distinct_names(self):
        names = [n for n in (self.model_name, self.baseline_name, self.proxy_name) if n is not None]
        if len(set(names)) != len(names):
            raise ValueError(f"model_name, baseline_name and proxy_name must differ, got {names}")
        return self


class RunConfig(_Strict):
    run_dir: str = "runs/default"
    seed: int = 0
    ray: RayConfig = Field(default_factory=RayConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    proxy: ModelConfig
    student: ModelConfig
    align: AlignConfig = Field(default_factory=AlignConfig)
    logits: LogitsConfig = Field(default_factory=LogitsConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    @field_validator("run_dir")
    @classmethod
    def _run_dir_nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("run_dir must not be empty")
        return v


class ConfigError(ValueError):
    """A config that cannot run; the message names the offending key."""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """`key.sub=value`; the value is parsed as YAML, so `3`, `1e-4`, `true`, `null`, `[a, b]` work."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def parse_config(tree: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return parse_config(apply_overrides(tree, overrides or []))


def fingerprint(*parts: Any) -> str:
    """Stable short hash of JSON-able parts; pydantic models count by their `artifact_view`."""
    norm = [artifact_view(p) if isinstance(p, BaseModel) else p for p in parts]
    return hashlib.sha256(json.dumps(norm, sort_keys=True, default=str).encode()).hexdigest()[:16]


def artifact_view(model: BaseModel) -> dict:
    """The model's JSON dump without its `operational` keys (at every depth): what decides a stage's
    artifacts, and so what its fingerprint reads."""
    dump = model.model_dump(mode="json")
    _drop_operational(model, dump)
    return dump


def _drop_operational(model: BaseModel, dump: dict) -> None:
    for name, field in type(model).model_fields.items():
        if name not in dump:
            continue
        if is_operational(field):
            del dump[name]
            continue
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            _drop_operational(value, dump[name])
        elif isinstance(value, list):
            for v, d in zip(value, dump[name]):
                if isinstance(v, BaseModel):
                    _drop_operational(v, d)
