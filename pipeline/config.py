"""Typed configuration: YAML files -> validated pydantic models.

Every stage reads one `Config`. Unknown keys, wrong types and missing required fields are
refused with the file, the key and what is expected. `--set a.b=value` overrides a key (the value
is parsed as YAML, so `--set rollout.n=8` is an int). The resolved config is frozen into
`RUN_DIR/config.yaml` on first use (see `pipeline.rundir.freeze_config`).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import UserError


class YamlLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads 1e-4 and 3E6 as floats (YAML 1.2; PyYAML's 1.1 rules
    make them strings, and `--set train.lr=1e-4` would then be refused as "not a number")."""


YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=YamlLoader)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"
DEFAULT_CONFIG = CONFIGS_DIR / "default.yaml"


class Section(BaseModel):
    # strict: YAML already gives typed values, so "3" for an int is a mistake worth naming.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelRef(Section):
    path: str = Field(description="HF model directory (save_pretrained layout) or hub name")


class PromptsConfig(Section):
    path: str = Field(description="local .jsonl/.json/.parquet/.arrow file or directory, or a hub dataset name")
    split: str = "train"
    prompt_field: str = "prompt"
    id_field: str | None = Field("id", description="unique prompt id column; null: the row index")
    template: str = Field("{prompt}", description="Python format string over the row's fields")
    chat_template: bool = Field(False, description="wrap the templated text as a user turn with the tokenizer's chat template")
    limit: int | None = Field(None, ge=1, description="use only the first N rows")
    prompts_per_round: int | None = Field(None, ge=1, description="prompts sampled per round (seeded, epoch-wise without replacement); null: all")


class VllmConfig(Section):
    dtype: str = "auto"
    max_model_len: int | None = None
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    enforce_eager: bool = False
    # Off by default: a warm prefix cache can change numerics, and rows must not depend on
    # which shards ran before in the same process (resume == uninterrupted run).
    enable_prefix_caching: bool = False
    cpu_kvcache_gib: float = Field(1.0, gt=0, description="VLLM_CPU_KVCACHE_SPACE for the CPU backend")
    # Engine and worker in this process: saves two process spawns (~30 s of start-up on a CPU).
    # null: in-process when there is no GPU and tensor_parallel_size is 1.
    in_process: bool | None = None
    device: str | None = Field(None, description="GPU for this engine in the persistent `run`, e.g. 'cuda:1' "
                               "(roles on different GPUs); null: vLLM's default (all visible GPUs from 0)")


class RolloutConfig(Section):
    n: int = Field(4, ge=1, description="responses per prompt")
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, description="-1: whole vocabulary")
    prompts_per_shard: int = Field(64, ge=1)
    # Queue the next shard's requests before finishing the current one (vLLM keeps its batch full
    # across shard boundaries). Rows stay identical after a resume when the engine's numerics do
    # not depend on batch composition (checked on CPU fp32; on GPU set VLLM_BATCH_INVARIANT=1, or
    # set this false: every shard then runs alone, in the same batches on every attempt).
    overlap_shards: bool = True
    vllm: VllmConfig = VllmConfig()


class ScoreTeacherConfig(Section):
    top_k: int = Field(16, ge=1, description="teacher top-k stored per token (the paper's FKL uses k = 16)")
    codec: str | None = Field(None, description="top-k log-prob codec (pipeline/codec.py); null: the measured default")
    token_budget: int = Field(16384, ge=1, description="padded tokens per teacher forward batch")
    token_chunk: int = Field(1024, ge=1, description="tokens per lm_head/log-softmax chunk (bounds fp32 [chunk, vocab])")
    vocab_chunk: int | None = Field(None, ge=1, description="also chunk the vocabulary (streaming log-sum-exp); null: whole rows")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    device_map: str | None = Field(None, description="e.g. 'auto' to spread a teacher over several GPUs (accelerate)")
    device: str | None = Field(None, description="where the teacher sits, e.g. 'cuda:1'; null: cuda:0 if there is "
                               "a GPU, else cpu (ignored with device_map)")
    eos_map: dict[str, str] = Field(default_factory=dict, description="student token -> teacher token before scoring, "
                                    "e.g. {'<|endoftext|>': '<|im_end|>'} for a base student and an instruct teacher")
    overlap_rollouts: bool = Field(True, description="persistent `run`: score rollout shard i while vLLM generates "
                                   "the next ones (no staleness added, identical rows); false: all rollouts first. "
                                   "Ignored with --per-stage-processes")


class TrainConfig(Section):
    # The objective (eopd.losses.ObjectiveConfig); defaults are the paper's EOPD.
    objective: Literal["eopd", "rkl", "fkl", "full", "jsd"] = "eopd"
    rkl_estimator: Literal["sampled", "topk"] = "sampled"
    fkl_mode: Literal["renorm", "tail"] = "renorm"
    tau: float = Field(0.8, ge=0, description="entropy gate threshold in nats (paper: 0.8)")
    gate_quantile: float | None = Field(None, gt=0, lt=1, description="gate on this quantile of the batch's teacher entropies instead of tau")
    lam: float = Field(1.0, ge=0, description="weight of the gated FKL term (paper: 1)")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO clip of the sampled RKL (paper silent; 0.2 usual)")
    jsd_beta: float = Field(0.5, gt=0, lt=1)
    # Optimisation (paper: AdamW, lr 3e-6, cosine, mini-batch 32 responses).
    lr: float = Field(3e-6, gt=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    batch_rows: int = Field(32, ge=1, description="responses per optimiser step")
    micro_batch_tokens: int = Field(8192, ge=1, description="padded tokens per forward/backward (gradient accumulation)")
    epochs: int = Field(1, ge=1, description="passes over the round's responses")
    data_order: Literal["round", "shards"] = Field(
        "round", description="round: each step's responses drawn from the whole round (a seeded permutation); "
        "shards: teacher shard after shard (each in a seeded order), so the persistent `run` starts training on the "
        "first teacher shards while it scores the rest (every response still from round r-1's student: no staleness)")
    loss_chunk: int = Field(512, ge=1, description="tokens per chunk of the memory-lean LM-head loss (bench/train_loss.py: 512 at V=151,936)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    gradient_checkpointing: bool = False
    device: str | None = Field(None, description="single-process training's device, e.g. 'cuda:2' (roles on different "
                               "GPUs in the persistent `run`); null: cuda:LOCAL_RANK if there is a GPU, else cpu")
    checkpoint_every: int = Field(50, ge=1, description="optimiser steps between checkpoints (also on SIGTERM)")
    keep_checkpoints: int = Field(2, ge=1)
    deepspeed: str | None = Field(None, description="DeepSpeed JSON config (e.g. configs/deepspeed/zero2.json); launch with deepspeed/torchrun")
    processes: int = Field(1, ge=1, description="ranks `eopd-pipe run` launches for training (torchrun); needs train.deepspeed when > 1")
    deterministic: bool = Field(True, description="torch deterministic algorithms (exact resume on CPU)")
    probe_tokens: int = Field(256, ge=1, description="fixed tokens on which the student's top-10 change rate is measured")
    tensorboard: bool = Field(False, description="also log to RUN_DIR/round-R/train/tb (needs tensorboard)")


class EvalConfig(Section):
    prompts: PromptsConfig | None = Field(None, description="evaluation problems (with an answer column); null: nothing to evaluate")
    answer_field: str = "answer"
    verifier: Literal["math", "toy"] = Field("math", description="math: the math-verify package (\\boxed{} and plain); toy: the embedded task's exact checker")
    samples: int = Field(8, ge=1, description="responses per problem; pass@1..pass@samples are reported (paper: 8)")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(0.8, gt=0, le=1, description="paper's evaluation: 0.8")
    max_tokens: int = Field(8192, ge=1)
    models: list[str] = Field(default_factory=lambda: ["base", "final"],
                              description="what `run` evaluates at the end: base, teacher, final, or round-N")
    vllm: VllmConfig = VllmConfig()
    # The learning curve: the persistent `run` evaluates the current student every N rounds on the
    # first `curve_problems` eval problems, with the rollout engine (weights loaded in place).
    every_rounds: int = Field(0, ge=0, description="persistent `run`: evaluate the student after every N-th round (and "
                              "base and teacher once) on the first curve_problems problems; results in "
                              "RUN_DIR/eval/curve/; 0: off")
    curve_problems: int = Field(64, ge=1, description="eval problems (the first N of eval.prompts) of each curve point")


class LoggingConfig(Section):
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow"]] = Field(
        default_factory=list, description="experiment trackers that get every metric (pipeline/trackers.py); "
        "each needs its extra, e.g. pip install '.[wandb]'")
    project: str = Field("eopd-pipe", description="the trackers' project / experiment name")
    run_name: str | None = Field(None, description="the trackers' run name; null: the run directory's name")
    summary_every: int = Field(0, ge=0, description="rounds between the summary lines `run` prints; 0: about ten "
                               "lines per run")


class Config(Section):
    seed: int = 0
    rounds: int = Field(1, ge=1)
    cpu_threads: int | None = Field(None, ge=1, description="torch threads of each eopd-pipe process on CPU (the teacher "
                                    "and trainer; OMP_NUM_THREADS of the processes it starts); null: torch's default, one "
                                    "per core. Tiny models run faster on 1 (the toy: 1.4x per round, bench/RESULTS.md)")
    student: ModelRef
    teacher: ModelRef
    prompts: PromptsConfig
    rollout: RolloutConfig = RolloutConfig()
    score_teacher: ScoreTeacherConfig = ScoreTeacherConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()


# ----------------------------------------------------------------------------- loading


def _format_validation_error(err: ValidationError, source: str, model: type[BaseModel]) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parent = _submodel(model, e["loc"][:-1])
            allowed = ", ".join(parent.model_fields) if parent else "?"
            lines.append(f"  {key}: unknown key (allowed here: {allowed})")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required field is missing")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _submodel(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        candidates = getattr(ann, "__args__", (ann,))
        sub = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if sub is None:
            return None
        model = sub
    return model


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["rollout.n=8", "seed=3"]` -> nested dict; values parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set rollout.n=8")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise UserError(f"--set {item!r}: value is not valid YAML ({e})") from None
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {p} is set both as a value and as a section")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, update: dict) -> dict:
    merged = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def read_yaml(path) -> dict:
    from pipeline import storage  # a run's frozen config.yaml may live on a bucket

    try:
        text = storage.read_text(path) if storage.is_remote(path) else Path(path).read_text()
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def validate(data: dict, source: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise UserError(_format_validation_error(e, source, Config)) from None


def storage_remote(path) -> bool:
    from pipeline import storage

    return storage.is_remote(path)


def load_config(path: Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (the embedded default when `path` is None) and apply `--set` overrides."""
    path = (path if storage_remote(path) else Path(path)) if path is not None else DEFAULT_CONFIG
    data = deep_merge(read_yaml(path), parse_overrides(overrides))
    source = str(path) + (f" (with --set {' '.join(overrides)})" if overrides else "")
    return validate(data, source)


def config_to_dict(cfg: Config) -> dict:
    return cfg.model_dump(mode="json")


def diff_configs(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable list of keys whose values differ: `key: old -> new`."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            lines += diff_configs(a, b, name + ".")
        elif a != b:
            lines.append(f"{name}: {a!r} -> {b!r}")
    return lines
