"""The Recipe: one typed config tree, validated once at the boundary.

YAML + ``key.path=value`` overrides -> :class:`Recipe`. Every problem is reported at once, each with its
key path and a hint (``did you mean ...``). Components receive plain values, never the YAML.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vlmtune.data.formats import FORMAT_NAMES
from vlmtune.data.media import DEFAULT_MAX_PIXELS
from vlmtune.errors import RecipeError
from vlmtune.families import PARTS
from vlmtune.scores import METRICS, check_metrics

DataFormat = Literal[("auto", *FORMAT_NAMES)]  # the rows of vlmtune/data/formats.py's table


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    name_or_path: str = Field(description="Hub id (e.g. Qwen/Qwen2.5-VL-3B-Instruct) or a local folder.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    attn_implementation: str | None = None  # None: the family's default (sdpa unless a family needs eager)
    trust_remote_code: bool = False
    revision: str | None = None
    # Image processor overrides, e.g. {max_pixels: 200704} for Qwen; passed to AutoProcessor.from_pretrained.
    processor_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("processor_kwargs")
    @classmethod
    def _loading_options_elsewhere(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in ("trust_remote_code", "revision"):
            if key in value:
                raise ValueError(f"{key} is not a processor option: set model.{key} (it applies to the config, "
                                 "model and processor alike) and remove it from processor_kwargs")
        return value


class DataSource(_Strict):
    source: str  # hub id, local folder, or a .json / .jsonl / .parquet file
    format: DataFormat = "auto"
    split: str = "train"
    limit: int | None = Field(default=None, ge=1)  # use only the first N rows
    prompt: str | None = None  # user prompt for cord_v2 / rdr / columns (image + text); format default if None
    system_prompt: str | None = None
    cord_target: Literal["tokens", "json"] = "tokens"  # Donut-style <s_key>..</s_key> or plain JSON
    bbox_units: Literal["pixels", "normalized"] = "pixels"  # nemotron_parse blocks: boxes in pixels or page fractions
    image_root: str | None = None  # base for relative image paths (default: the data file's folder)
    # columns format: which column holds what
    image_column: str = "image"
    text_column: str = "text"
    question_column: str = "question"
    answer_column: str = "answer"


class VideoConfig(_Strict):
    """Which frames of each video are decoded (vlmtune/data/video.py). Unset: the model's video processor settings
    (e.g. Qwen3-VL 2 fps, SmolVLM2 1 fps up to 64 frames), else 8 frames."""

    fps: float | None = Field(default=None, gt=0)  # frames per second of video, spread uniformly
    num_frames: int | None = Field(default=None, ge=1)  # or exactly this many, spread uniformly
    max_frames: int | None = Field(default=None, ge=1)  # at most this many
    start: float | None = Field(default=None, ge=0)  # seconds: only the part of each video from start ...
    end: float | None = Field(default=None, gt=0)  # ... to end

    @model_validator(mode="after")
    def _consistent(self) -> VideoConfig:
        if self.fps is not None and self.num_frames is not None:
            raise ValueError("set fps (frames per second) or num_frames (frames per video), not both")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError(f"end ({self.end}) must be after start ({self.start})")
        if self.num_frames is not None and self.max_frames is not None and self.max_frames < self.num_frames:
            raise ValueError(f"max_frames ({self.max_frames}) is below num_frames ({self.num_frames}); drop one")
        return self


class DataConfig(_Strict):
    train: DataSource
    validation: DataSource | None = None
    num_workers: int = Field(default=0, ge=0)
    max_bad_fraction: float = Field(default=0.5, ge=0.0, le=1.0)  # stop when more than this is skipped
    # Larger images are skipped and counted (decoding takes 3 bytes a pixel, and more on the way to the processor).
    max_image_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)  # also the cap on a video frame
    video: VideoConfig = Field(default_factory=VideoConfig)


class TrainConfig(_Strict):
    max_steps: int | None = Field(default=None, ge=1)
    epochs: float | None = Field(default=None, gt=0)
    micro_batch_size: int = Field(default=1, ge=1)
    global_batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=1e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(default=0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    seed: int = 0
    val_every_steps: int | None = Field(default=None, ge=1)
    val_max_batches: int | None = Field(default=None, ge=1)
    max_length: int = Field(default=2048, ge=8)
    # Over max_length: drop (counted too_long), truncate_text (cut text after the last image or video), or
    # fewer_frames (sample fewer frames of the sample's videos until it fits).
    overlong: Literal["drop", "truncate_text", "fewer_frames"] = "drop"
    log_every_steps: int = Field(default=1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # After the first step's backward: every trainable parameter got a gradient, every frozen one none.
    check_gradients: bool = True
    max_bad_steps: int = Field(default=5, ge=1)  # stop after this many NaN/inf-loss steps in a row (each skipped)
    # Padding-free: the samples of a micro-batch go into one row, each with its own positions, attention kept
    # within each sample (vlmtune/batching.py). Families where that cannot be exact refuse it.
    packing: bool = False
    # Token budget per micro-batch (image tokens count): each step's samples are regrouped by length into
    # micro-batches of at most this many tokens (padded size when not packing). None: micro_batch_size samples.
    micro_batch_tokens: int | None = Field(default=None, ge=8)
    # Loss over chunks of this many supervised tokens, gradients computed chunk by chunk, so full-vocabulary
    # logits exist for one chunk at a time (vlmtune/loss.py). None: one logits tensor for all supervised tokens.
    loss_chunk_tokens: int | None = Field(default=1024, ge=1)
    # liger: Liger Kernel's fused linear cross-entropy (in place of the chunk loop; needs loss_chunk_tokens set) and
    # RMSNorm (CUDA + `pip install liger-kernel`), applied to the loaded model only (vlmtune/kernels.py).
    # torch: vlmtune's own loss and the model's own modules.
    kernels: Literal["torch", "liger"] = "torch"
    # Weight of a token's loss by its target: token strings or globs -> weight, e.g. {"<x_*>": 10} (Nemotron-Parse's
    # coordinate tokens). The step still divides the weighted sum by the number of supervised tokens.
    token_weights: dict[str, float] = Field(default_factory=dict)
    # varlen: vision towers that attend by window or image (Qwen2-VL ... Qwen3.5, Kimi-VL) and packed text rows run
    # one variable-length attention call per layer, segment bounds computed on the host (vlmtune/attention.py,
    # vlmtune/vision.py; exact against stock). stock: transformers' own attention (sdpa per window / image).
    attention: Literal["varlen", "stock"] = "varlen"
    # Regional torch.compile of every decoder layer and vision block (vlmtune/compile.py); costs compile time once,
    # and whether it pays on a GPU is not measured yet (docs/benchmarks.md).
    compile: bool = False

    @field_validator("token_weights")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not v > 0}
        if bad:
            raise ValueError(f"weights must be > 0, got {bad}")
        return value


class FreezeConfig(_Strict):
    vision_tower: bool = False
    projector: bool = False
    language_model: bool = False


class PeftConfig(_Strict):
    """LoRA / DoRA adapters through ``peft`` (vlmtune/peft.py); absent or null: full fine-tune.

    With adapters every base weight is frozen, and ``freeze.<part>: true`` means "no adapters in that part".
    """

    method: Literal["lora", "dora"] = "lora"
    r: int = Field(default=16, ge=1)
    alpha: float = Field(default=32, gt=0)
    # 0 by default: with dropout peft copies each adapted layer's input (memory and time on every layer), and
    # fused MoE experts take adapters only without it. Set 0.05-0.1 for small datasets that overfit.
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    use_rslora: bool = False
    # Names or glob patterns, matched against a module's full dotted name or any dotted suffix of it:
    # q_proj, self_attn.q_proj, *.q_proj, layers.0.*. None (or "all-linear"): every nn.Linear of the parts
    # that get adapters, except the output head. Targets are always limited to those parts.
    target_modules: list[str] | None = None
    exclude_modules: list[str] = Field(default_factory=list)
    modules_to_save: list[str] = Field(default_factory=list)  # trained in full, saved with the adapter
    vision: bool = False  # adapters in the vision tower too
    projector: bool = False  # adapters in the projector too
    quantize: Literal["4bit"] | None = None  # QLoRA: NF4 base weights (bitsandbytes, CUDA only)

    @field_validator("target_modules", "exclude_modules", "modules_to_save", mode="before")
    @classmethod
    def _name_or_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("target_modules")
    @classmethod
    def _not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("is empty; leave it unset (null) for every linear layer of the adapted parts")
        return value


class OptimConfig(_Strict):
    # Learning rate of a part = train.lr x its multiplier (default 1.0), e.g. {vision_tower: 0.1}.
    lr_multipliers: dict[str, float] = Field(default_factory=dict)

    @field_validator("lr_multipliers")
    @classmethod
    def _known_parts(cls, value: dict[str, float]) -> dict[str, float]:
        for part, mult in value.items():
            if part not in PARTS:
                close = difflib.get_close_matches(part, PARTS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown part {part!r}{hint} (the parts are {', '.join(PARTS)})")
            if not mult > 0:
                raise ValueError(f"{part}: multiplier {mult} must be > 0; to not train a part, set freeze.{part}=true")
        return value


class BestConfig(_Strict):
    """Keep the model of the best evaluation in output_dir/best (a Hugging Face folder; best.json says the step)."""

    metric: str  # one of the eval metrics, e.g. cord_ted
    mode: Literal["max", "min"] | None = None  # None: the metric's direction (error rates are minimised)


class CheckpointConfig(_Strict):
    """output_dir/checkpoints/step-NNNNNN (see vlmtune/checkpoint.py); SIGTERM/SIGINT always save one."""

    every_steps: int | None = Field(default=None, ge=1)  # None: only when stopped by a signal
    keep: int = Field(default=2, ge=1)  # the newest K complete checkpoints stay
    best: BestConfig | None = None


class EvalConfig(_Strict):
    """Generation on a split scored by task metrics (vlmtune/evaluate.py): during training (every ``every_steps``
    and after the last step) when this section is in the recipe, and by ``vlmtune evaluate``."""

    every_steps: int | None = Field(default=None, ge=1)  # None: only after the last step
    split: Literal["validation", "train"] = "validation"
    max_samples: int | None = Field(default=None, ge=1)  # the first N samples of the split; None: all
    metrics: list[str] | None = None  # None: the data format's defaults (vlmtune/scores.py DEFAULT_METRICS)
    max_new_tokens: int = Field(default=128, ge=1)
    batch_size: int = Field(default=8, ge=1)
    strip_thinking: bool = True  # think blocks (the family's think_tags) are removed before scoring

    @field_validator("metrics")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else check_metrics(value)


class DistributedConfig(_Strict):
    """Several processes under torchrun (vlmtune/parallel.py, docs/distributed.md); unused in one process."""

    strategy: Literal["fsdp2", "ddp", "none"] | None = None  # None: fsdp2 when the world size > 1
    dp_replicate: int = Field(default=1, ge=1)  # HSDP: replica groups; parameters sharded within each group
    dp_shard: int | None = Field(default=None, ge=1)  # None: world size / dp_replicate
    cpu_offload: bool = False  # FSDP2: parameters, gradients and optimizer state in CPU memory
    activation_checkpointing: Literal["none", "language", "vision", "all"] = "none"
    find_unused_parameters: bool = False  # DDP: set when a trainable parameter may get no gradient in a step
    timeout_s: float = Field(default=600.0, gt=0)  # a rank that fails or hangs ends the others after this long


class LoggingConfig(_Strict):
    """Experiment trackers, each through its own library (vlmtune/trackers.py); metrics.jsonl is always written."""

    backends: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(default_factory=list)
    project: str = "vlmtune"
    run_name: str | None = None  # None: the output_dir's folder name
    tags: list[str] = Field(default_factory=list)
    on_error: Literal["raise", "warn"] = "raise"
    wandb_mode: Literal["offline", "online"] = "offline"
    mlflow_tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db

    @field_validator("backends", "tags", mode="before")
    @classmethod
    def _name_or_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("backends")
    @classmethod
    def _no_repeats(cls, value: list[str]) -> list[str]:
        repeated = sorted({b for b in value if value.count(b) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} listed more than once")
        return value


class Recipe(_Strict):
    output_dir: str = "runs/demo"
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    peft: PeftConfig | None = None  # null: full fine-tune
    optim: OptimConfig = Field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig | None = None  # null: no evaluation during training
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    # null: start fresh; "auto": the newest complete checkpoint in output_dir/checkpoints (fresh if none);
    # a path: that checkpoint folder.
    resume: str | None = None


def safe_yaml(text: str, where: str) -> Any:
    """Plain YAML only (``yaml.safe_load``: no ``!!python/...`` objects); a syntax error names the line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = str(getattr(e, "problem", None) or e).strip()
        if "python/" in what or "constructor" in what:
            what = (f"{what}: recipes are plain YAML (numbers, strings, lists, mappings); vlmtune never builds "
                    "Python objects from them")
        raise RecipeError(f"{where}{at}: {what}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value parsed as YAML, so 3 -> int, true -> bool, null -> None)."""
    if "=" not in item:
        raise RecipeError(f"override {item!r} is not of the form key.path=value (e.g. train.max_steps=100)")
    key, raw = item.split("=", 1)
    value = safe_yaml(raw, f"override {item!r}") if raw.strip() else ""
    return key.strip().split("."), value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = tree
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return tree


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"recipe {str(path)!r} cannot be read ({e}); save it as UTF-8 text") from None
    tree = safe_yaml(text, f"recipe {str(path)!r}") or {}
    if not isinstance(tree, dict):
        raise RecipeError(f"recipe {str(path)!r} must be a mapping at the top level")
    return tree


def _known_keys(model: type[BaseModel], path: tuple) -> list[str]:
    """The field names at a key path of the schema, for 'did you mean' hints."""
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        candidates = [a for a in getattr(field.annotation, "__args__", ()) or (field.annotation,)]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _format_error(err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    key = ".".join(str(p) for p in loc) or "(recipe)"
    if err["type"] == "extra_forbidden":
        known = _known_keys(Recipe, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
        return f"{key}: unknown key{hint} (known here: {', '.join(known)})"
    if err["type"] == "missing":
        return f"{key}: required, but not set"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{key}: {msg} (got {err.get('input')!r})" if err["type"] != "value_error" else f"{key}: {msg}"


def _problems(lines: list[str]) -> RecipeError:
    return RecipeError(f"the recipe has {len(lines)} problem(s):\n  - " + "\n  - ".join(lines))


def cross_field_problems(r: Recipe) -> list[str]:
    """Problems no single key shows, every one of them (each valid value alone, impossible together)."""
    t, f, p = r.train, r.freeze, r.peft
    out = []
    if t.global_batch_size % t.micro_batch_size:
        out.append(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of micro_batch_size "
                   f"({t.micro_batch_size}); gradient accumulation = global / (micro * world size)")
    if t.max_steps is None and t.epochs is None:
        out.append("set train.max_steps or train.epochs")
    if t.micro_batch_tokens is not None and t.micro_batch_tokens < t.max_length:
        out.append(f"train.micro_batch_tokens ({t.micro_batch_tokens}) must be at least train.max_length "
                   f"({t.max_length}), so that every sample fits in a micro-batch")
    best = r.checkpoint.best
    if best is not None and r.eval is None:
        out.append("checkpoint.best needs an eval section (the metric comes from evaluation during training); add "
                   "eval: {every_steps: N} or remove checkpoint.best")
    elif best is not None and best.metric not in (r.eval.metrics or METRICS):
        out.append(f"checkpoint.best.metric: {best.metric!r} is not among the eval metrics "
                   f"{r.eval.metrics or sorted(METRICS)}")
    if r.eval is not None and r.eval.split == "validation" and r.data.validation is None:
        out.append("eval.split=validation, but the recipe has no data.validation; add one or set eval.split=train")
    if t.token_weights and t.kernels == "liger":
        out.append("train.token_weights is not supported with train.kernels=liger (Liger's fused loss has no "
                   "per-token weights); use train.kernels=torch")
    if f.vision_tower and f.projector and f.language_model:
        out.append("freeze.vision_tower, freeze.projector and freeze.language_model are all true: nothing would "
                   "train; unfreeze at least one")
    if p is not None:  # with adapters, freeze.<part>=true means "no adapters in that part"
        for switch, part in (("vision", "vision_tower"), ("projector", "projector")):
            if getattr(p, switch) and getattr(f, part):
                out.append(f"peft.{switch}=true puts adapters in the {part}, but freeze.{part}=true says nothing "
                           "there trains (with peft, freeze.<part> means no adapters in that part); set one of "
                           "them to false")
        if f.language_model and not (p.vision or p.projector or p.modules_to_save):
            out.append("freeze.language_model=true (with peft: no adapters in the language model) and "
                       "peft.vision / peft.projector are false: nothing would train; set peft.vision=true or "
                       "peft.projector=true, or unfreeze the language model")
    return out


def accumulation_steps(train: TrainConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank: global batch / (micro-batch x world size), exactly."""
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise _problems([f"train.global_batch_size: {train.global_batch_size} is not a multiple of "
                         f"train.micro_batch_size ({train.micro_batch_size}) x the world size ({world_size}); "
                         f"use a multiple of {per_step}, or another micro_batch_size"])
    return train.global_batch_size // per_step


def build_recipe(tree: dict) -> Recipe:
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as e:
        raise _problems([_format_error(err) for err in e.errors()]) from None
    problems = cross_field_problems(recipe)
    if problems:
        raise _problems(problems)
    return recipe


def load_recipe(path: str | Path | None, overrides: list[str] = (), default: dict | None = None) -> Recipe:
    tree = load_yaml(path) if path else dict(default or {})
    return build_recipe(apply_overrides(tree, list(overrides)))


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
