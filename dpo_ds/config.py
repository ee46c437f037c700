"""The run's settings: typed, documented where declared, validated once on load.

Every setting has one dotted name, the same in YAML and on the command line
(`--dpo.beta=2000`). Unknown keys and wrong types are errors naming the key.
The DeepSpeed JSON is resolved here too (its "auto" values filled from the
run's config), so a bad setting fails before any process group starts.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


FLOW_SETTINGS = ("flow_shift", "sigma_density", "logit_mean", "logit_std")  # ModelConfig's, for flow families only
EDM_SETTINGS = ("edm_p_mean", "edm_p_std")  # ModelConfig's, for EDM families (svd) only


class LoraConfig(_Section):
    """LoRA adapters on the denoiser (peft): the base weights are frozen, never in the optimizer, and only
    the adapters train, checkpoint and export (README, LoRA)."""
    rank: int = Field(16, ge=1)
    """r: the rank of each adapter's update B·A."""
    alpha: float | None = Field(None, gt=0)
    """The update is scaled by alpha / rank; null: alpha = rank (a scale of 1)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on each adapter's input while training."""
    targets: list[str] | None = None
    """The modules that get an adapter: shell-style patterns (fnmatch, `*` crosses dots) on the names of the
    denoiser's Linear and Conv2d modules, e.g. `["*.attn2.to_k", "*.attn2.to_v"]`. null: the family's
    default (its attention projections, to_q/to_k/to_v/to_out.0; `motion`: those of its motion modules).
    A pattern that matches no such module is an error at start."""
    init: Literal["default", "gaussian"] = "default"
    """How A is drawn (B is zero either way, so the first step's policy is the base model): `default`,
    peft's Kaiming-uniform; `gaussian`, N(0, 1/rank)."""


class ModelConfig(_Section):
    family: str = "sdxl"
    """Model family (dpo_ds/models/): the denoiser class, its conditioning, latent layout, forward process
    and the law of each pair's draw. `sdxl`: SDXL; `sd15`: SD 1.5 and SD 2.x (one CLIP text encoder);
    `unet3d`: ModelScope / Zeroscope text-to-video (UNet3DConditionModel, one CLIP text encoder, DDPM);
    `motion`: AnimateDiff (UNetMotionModel: SD 1.5 with motion modules, which alone train by default);
    `wan`: Wan 2.1 text-to-video (a transformer trained by flow matching); `svd`: Stable Video Diffusion
    image-to-video (UNetSpatioTemporalConditionModel, EDM; docs/design.md §9)."""
    pretrained_path: str | None = None
    """Local diffusers model folder holding the family's denoiser (`unet/` or `transformer/`) and `scheduler/`.
    Required unless `denoiser_config` is set."""
    denoiser_config: str | None = None
    """Path to a denoiser config.json to build a freshly initialised model from (tests, toy runs)."""
    scheduler_config: str | None = None
    """Path to a scheduler_config.json; default `pretrained_path/scheduler/scheduler_config.json`."""
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """Override the scheduler's prediction type (what the denoiser predicts)."""
    attention: Literal["sdpa", "xformers"] = "sdpa"
    """Attention kernel: PyTorch SDPA, or xformers (GPU, must be installed: `pip install .[xformers]`)."""
    trainable: list[str] | None = None
    """Which of the denoiser's parameters train: shell-style patterns (Python's fnmatch, case-sensitive; `*`
    matches any characters, dots included) matched against the names of its `named_parameters()`, e.g.
    `["up_blocks.*"]` or `["*.attn2.to_k.*", "*.attn2.to_v.*"]`. Every other parameter is frozen: no gradient,
    no optimizer state, unchanged by training; checkpoints and exports still hold the whole model. null:
    the family's default, every parameter except for `motion` (its motion modules, `*motion_modules.*`);
    `["*"]` trains all. A pattern that matches no parameter is an error at start."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of the denoiser's weights (`model.lora.rank=16`, ...; null: a full fine-tune,
    or the `trainable` subset). Pairs with reference.mode=adapters_off, the reference for free."""
    gradient_checkpointing: bool | Literal["selective"] = True
    """Non-reentrant activation checkpointing of the policy: less memory, ~30% more compute. true: the family's
    own (diffusers' per layer; unet3d per block); `selective`: every other one of the denoiser's blocks (UNets:
    down, mid and up blocks; transformers: their blocks), about half the memory saved for half the recompute;
    false: none (fastest, most activation memory)."""
    channels_last: bool = False
    """UNet families: feed the denoiser channels-last latents (channels innermost in memory), which GPU
    convolution kernels prefer in bf16; each convolution follows its input's format, so the activations stay
    channels-last. The weights keep the default layout: DeepSpeed holds them in flat buffers. Off until
    tools/bench.py measures it on a GPU."""
    compile: Literal["none", "default", "max-autotune-no-cudagraphs"] = "none"
    """torch.compile each of the denoiser's repeated blocks (not the whole engine) with this mode; the first
    steps then take minutes to compile. Modes that capture CUDA graphs are not offered: ZeRO-3 gathers
    parameters into new memory every step, which a graph cannot replay."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Training precision: auto is bf16 on GPUs that have it, fp32 on the CPU."""
    vae_scale_factor: int = 8
    """Pixels per latent element along each spatial side; latent size = data.resolution / this."""
    flow_shift: float | None = Field(None, gt=0)
    """Flow-matching families (wan): the shift s applied to each drawn σ, σ' = s·σ / (1 + (s − 1)·σ);
    default the scheduler config's (`shift`, or `flow_shift` with use_flow_sigmas: 3.0 in Wan 2.1 T2V)."""
    sigma_density: Literal["uniform", "logit_normal"] = "uniform"
    """Flow-matching families (wan): the density σ is drawn from before the shift: uniform on [0, 1), or
    logit-normal, σ = sigmoid(n) with n ~ N(logit_mean, logit_std²) (SD3's training default)."""
    logit_mean: float = 0.0
    """With sigma_density=logit_normal: the mean of logit(σ) before the shift."""
    logit_std: float = Field(1.0, gt=0)
    """With sigma_density=logit_normal: the standard deviation of logit(σ) before the shift."""
    edm_p_mean: float = 0.7
    """EDM families (svd): ln σ ~ N(edm_p_mean, edm_p_std²). 0.7 and 1.6 are what SVD fine-tuning scripts use
    (SVD_Xtend's train_svd.py and its descendants); EDM's paper and sgm's EDMSampling default to −1.2, 1.2."""
    edm_p_std: float = Field(1.6, gt=0)
    """EDM families (svd): the standard deviation of ln σ."""

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if (self.pretrained_path is None) == (self.denoiser_config is None):
            raise ValueError("set exactly one of model.pretrained_path (a diffusers folder) or "
                             "model.denoiser_config (a config.json)")
        if self.lora is not None and self.trainable is not None:
            raise ValueError("model.trainable and model.lora exclude each other: with LoRA every base weight is "
                             "frozen and only the adapters train (choose them with model.lora.targets)")
        if self.denoiser_config is not None and self.scheduler_config is None:
            raise ValueError("model.denoiser_config needs model.scheduler_config (a scheduler_config.json)")
        return self

    @model_validator(mode="after")
    def _flow_settings_need_a_flow_family(self) -> "ModelConfig":
        from dpo_ds.models import FAMILIES

        if not getattr(FAMILIES[self.family], "DRAWS_SIGMA", False):
            # Compared with the defaults, not "was the key given": a run's saved config.yaml (export, resume)
            # lists every setting with its value.
            given = [name for name in FLOW_SETTINGS if getattr(self, name) != type(self).model_fields[name].default]
            if given:
                raise ValueError(f"model.{given[0]} is a flow-matching setting (model.family=wan); "
                                 f"model.family={self.family} does not draw flow-matching σ: remove it")
        if self.channels_last and not getattr(FAMILIES[self.family], "HAS_CONV_LATENTS", False):
            raise ValueError(f"model.channels_last is for the UNet families; model.family={self.family} "
                             "runs no convolutions on its latents: remove it")
        if not getattr(FAMILIES[self.family], "DRAWS_EDM", False):
            given = [name for name in EDM_SETTINGS if getattr(self, name) != type(self).model_fields[name].default]
            if given:
                raise ValueError(f"model.{given[0]} is an EDM setting (model.family=svd); "
                                 f"model.family={self.family} does not draw EDM σ: remove it")
        return self

    @field_validator("family")
    @classmethod
    def _known_family(cls, name: str) -> str:
        from dpo_ds.models import FAMILIES  # the registry: a new family is a module there, not an edit here

        if name not in FAMILIES:
            raise ValueError(f"model.family: unknown family {name!r}; the families are {sorted(FAMILIES)}")
        return name


class DataConfig(_Section):
    shards: str | list[str]
    """Shards to train on: a .tar path, a brace pattern, a directory, a `pipe:` URL, or a list of these."""
    resolution: int | None = 1024
    """Image resolution in pixels the latents were encoded at (latent side = resolution / model.vae_scale_factor).
    null: latents of any shape, for image shards of several sizes (tools/encode_pairs.py --buckets), which the
    loader batches one shape at a time (shape buckets, docs/design.md §6)."""
    num_workers: int = Field(2, ge=0)
    """Loader worker processes per rank; they also draw each pair's timestep and noise."""
    shuffle_buffer: int = Field(256, ge=1)
    """Pairs held per worker for shuffling within an epoch."""
    pin_memory: bool = True
    """On GPUs, put each batch in page-locked host memory, so that its copy to the device is asynchronous
    (ignored on the CPU)."""
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)
    """Stop the run once more than this fraction of the pairs read were bad (skipped)."""
    empty_prompt_prob: float = Field(0.0, ge=0.0, lt=1.0)
    """Train this fraction of pairs on the empty prompt (classifier-free guidance keeps working after
    fine-tuning; the Diffusion-DPO authors used 0.2). Which pairs is part of each pair's seeded draw, so a
    reference cache stays valid; needs empty_prompt.safetensors beside the shards (tools/encode_pairs.py)."""
    timestep_range: tuple[int, int] | None = None
    """Draw timesteps from [lo, hi) only; default all training timesteps."""
    val_shards: str | list[str] | None = None
    """Held-out pairs (same forms as `shards`), scored without gradient every `val_every` steps at a
    fixed draw (draw index 0), so the numbers compare across steps."""
    val_every: int = Field(0, ge=0)
    """Validate every N optimizer steps (0: never)."""
    val_max_batches: int = Field(16, ge=1)
    """Micro-batches per rank per validation."""


class DPOConfig(_Section):
    beta: float = Field(5000.0, gt=0)
    """β of Diffusion-DPO with mean-reduced errors (docs/design.md §1); 5000 for SDXL in the paper's scripts."""


class LossConfig(_Section):
    type: Literal["dpo", "ipo", "sft"] = "dpo"
    """`dpo`: Diffusion-DPO (the paper's); `ipo`: a bounded squared target on the same margin;
    `sft`: the plain diffusion objective on both images of every pair (no reference; trains a reference)."""
    loser_weight: float = Field(1.0, ge=0, le=1)
    """Scale of the gradient through the loser's error (1: the paper's DPO; 0: the loser only
    weights the sigmoid). Lowering it guards against raising the loser's error in ways that do
    not move samples away from it."""
    sft_weight: float = Field(1.0, ge=0)
    """Add sft_weight x mean(e_w): keep denoising the preferred images well. 1 by default (dpo+sft, the
    README's recommendation): beside the DPO term's gradient on e_w, β/2·σ (1250 at σ = 1/2, β = 5000), it
    is negligible until the sigmoid saturates; then it is what is left, and keeps the samples on the data
    (README, "Does it work?"). 0: the paper's loss alone."""
    winner_hinge: float = Field(0.0, ge=0)
    """Add winner_hinge x mean(max(0, e_w - r_w)): penalise getting worse than the reference on winners."""
    ipo_margin: float = Field(1.0, gt=0)
    """With type=ipo: the reward margin -(beta/2)·z each pair is pulled to."""


class TrainConfig(_Section):
    micro_batch_size: int = Field(1, ge=1)
    """Preference pairs per rank per micro-step (each pair runs the policy on winner and loser)."""
    grad_accum: int = Field(1, ge=1)
    """Micro-steps per optimizer step."""
    max_steps: int = Field(ge=1)
    """Optimizer steps to train for."""
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this (0 disables)."""
    max_nonfinite_in_row: int = Field(5, ge=1)
    """Stop after this many consecutive micro-batches with a non-finite loss (each is skipped); with
    nonfinite_check=logging, after this many in one logging window."""
    nonfinite_check: Literal["micro_batch", "logging"] = "micro_batch"
    """`micro_batch`: check each micro-batch's loss before backward and skip a non-finite one on every rank
    (one host-device synchronisation per micro-batch). `logging`: no synchronisation in the step: a non-finite
    loss goes through backward, DeepSpeed skips that optimizer step (its gradient norm is non-finite), and the
    trainer counts such micro-batches on the device and reads the count at each logging interval."""


class OptimConfig(_Section):
    name: Literal["adamw", "adafactor"] = "adamw"
    """AdamW, or Adafactor (no first moment: half of AdamW's optimizer memory; the paper used it for SDXL).

    ZeRO hands the optimizer flat 1-D partitions, so Adafactor's row/column
    factoring does not apply under ZeRO-2/3: it keeps a full second moment."""
    lr: float = Field(1e-5, gt=0)
    """Peak learning rate; with `scale_lr`, per pair of the global batch (the rate used is lr x global batch).

    The Diffusion-DPO authors' SDXL run used 1e-8 with scaling on, at a global batch of 2048 pairs
    (1 per GPU x 128 accumulation x 16 GPUs): 1e-8 x 2048 = 2.048e-5 is the rate they trained at.
    Their 1e-8 without scale_lr is about 2000x too small."""
    scale_lr: bool = False
    """Multiply lr by the global batch (train.micro_batch_size x train.grad_accum x processes), as the
    authors' `--scale_lr` does; the rate actually used is logged at start and as train/lr."""
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from 0 to lr over this many steps."""
    schedule: Literal["constant", "cosine"] = "constant"
    """After warmup: constant, or cosine decay to lr * min_lr_ratio at train.max_steps."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    implementation: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    """AdamW's kernel (PyTorch's): `fused` updates each flat ZeRO partition in one kernel, `foreach` in one
    kernel per operation, `for_loop` tensor by tensor; auto: fused on GPUs, PyTorch's default on the CPU.
    Not for adafactor, an offloaded optimizer (DeepSpeed's CPU Adam) or a DeepSpeed JSON optimizer section."""

    @model_validator(mode="after")
    def _implementation_is_adamw(self) -> "OptimConfig":
        if self.implementation != "auto" and self.name != "adamw":
            raise ValueError(f"optim.implementation={self.implementation} chooses AdamW's kernel; optim.name="
                             f"{self.name}: remove it")
        return self

    def peak_lr(self, global_batch: int) -> float:
        """The learning rate the optimizer peaks at, for `global_batch` pairs per optimizer step."""
        return self.lr * global_batch if self.scale_lr else self.lr


class ReferenceConfig(_Section):
    mode: Literal["live", "cache", "adapters_off"] = "live"
    """Where reference errors come from: `live` runs the frozen reference model each step; `cache` reads
    them from reference.cache_dir (written by tools/precompute_ref.py) and never builds the reference;
    `adapters_off` (with model.lora) runs the policy itself with its LoRA adapters disabled, under no_grad in
    the same micro-step: the base model is the reference, and no second model is built."""
    cache_dir: str | None = None
    """Reference cache directory: read by training with mode=cache, written by tools/precompute_ref.py."""
    val_cache_dir: str | None = None
    """With mode=cache and validation on: the cache of data.val_shards (tools/precompute_ref.py
    --data.shards=VAL --reference.cache_dir=THIS --num-draws 1)."""
    pretrained_path: str | None = None
    """Reference weights (a diffusers folder); default: the policy's initial weights."""
    offload: Literal["cpu", "none"] = "cpu"
    """Where the live reference's ZeRO-3 parameter partitions live between uses."""
    drift_check_every: int = Field(0, ge=0)
    """With mode=cache: every N optimizer steps recompute some cached errors with a live reference and log the
    largest absolute difference as ref/cache_drift (0 = off; on, the reference model is built after all)."""
    drift_check_fraction: float = Field(0.25, gt=0, le=1)
    """Fraction of a micro-batch's pairs (at least one) that a drift check recomputes."""

    @model_validator(mode="after")
    def _cache_settings(self) -> "ReferenceConfig":
        if self.mode == "cache" and not self.cache_dir:
            raise ValueError("reference.mode=cache needs reference.cache_dir (a folder written by tools/precompute_ref.py)")
        if self.drift_check_every and self.mode != "cache":
            raise ValueError("reference.drift_check_every compares a cache with the live reference; "
                             "it needs reference.mode=cache (or set it to 0)")
        return self


class CheckpointConfig(_Section):
    every_steps: int = Field(500, ge=1)
    """Write a DeepSpeed checkpoint every N optimizer steps (and at the end)."""
    keep_last: int = Field(3, ge=1)
    """Keep this many newest complete checkpoints; older ones are deleted."""
    resume: str = "none"
    """`none`, `auto` (newest complete checkpoint in output_dir, if any), or a checkpoint tag."""
    export: bool = True
    """At the end, write the trained denoiser as a diffusers folder under output_dir/export/."""


class LoggingConfig(_Section):
    every_steps: int = Field(1, ge=1)
    """Reduce and write scalars every N optimizer steps."""
    gap_w_window: int = Field(50, ge=1)
    """Warn when train/gap_w (e_w - r_w) stayed above zero for this many steps in a row:
    the policy is getting worse on what was preferred."""
    loser_gap_ratio: float = Field(30.0, gt=0)
    """Warn (samples may be leaving the data) when, averaged over logging.manifold_window steps, the policy's
    error on losers rose above the reference's (train/gap_l) more than this many times as much as its error
    on winners fell below it (-train/gap_w); dpo_ds.metrics.ManifoldWatch."""
    manifold_window: int = Field(20, ge=1)
    """Logged steps (logging.every_steps apart) the loser_gap_ratio warning averages over."""
    progress: bool = True
    """Console progress bar with ETA on rank 0."""
    peak_tflops: float | str | None = None
    """The peak perf/mfu divides perf/tflops by: a number (dense bf16 TFLOP/s of one device) or a device
    name, A100 (312), H100 (989), H200 (989) or B200 (2250). null: the GPU's name decides (any other GPU,
    and CPU, log no perf/mfu)."""

    @field_validator("peak_tflops")
    @classmethod
    def _known_peak(cls, v: float | str | None) -> float | str | None:
        from dpo_ds.perf import PEAK_TFLOPS

        if isinstance(v, str) and v.upper() not in PEAK_TFLOPS:
            raise ValueError(f"logging.peak_tflops: unknown device {v!r}; give a number (TFLOP/s) or one of "
                             f"{', '.join(PEAK_TFLOPS)}")
        if isinstance(v, (int, float)) and v <= 0:
            raise ValueError(f"logging.peak_tflops: {v} must be positive")
        return v


class RunConfig(_Section):
    output_dir: str
    """Where the run writes config.yaml, tensorboard/, checkpoints/ and export/."""
    seed: int = 0
    """Global seed: the data order, every pair's draw and model init derive from it."""
    model: ModelConfig
    data: DataConfig
    dpo: DPOConfig = DPOConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig
    optim: OptimConfig = OptimConfig()
    reference: ReferenceConfig = ReferenceConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _cross_section(self) -> "RunConfig":
        if self.data.val_every and not self.data.val_shards:
            raise ValueError("data.val_every needs data.val_shards (held-out shards)")
        if self.reference.mode == "adapters_off" and self.model.lora is None:
            raise ValueError("reference.mode=adapters_off needs model.lora (it disables the LoRA adapters to get "
                             "the base model); set model.lora.rank, or use reference.mode=live")
        if self.reference.mode == "adapters_off" and self.reference.pretrained_path is not None:
            raise ValueError("reference.mode=adapters_off uses the policy's base weights as the reference; "
                             "reference.pretrained_path needs reference.mode=live or cache")
        if self.data.val_every and self.reference.mode == "cache" and self.loss.type != "sft" \
                and not self.reference.val_cache_dir:
            raise ValueError("validation with reference.mode=cache needs reference.val_cache_dir "
                             "(precompute the reference on data.val_shards)")
        return self

    @field_validator("output_dir")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v:
            raise ValueError("output_dir must not be empty")
        return v


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-5` (no dot) as a string; learning rates are written that way."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml(text) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ValueError(f"--{dotted}: {name} is not a section")
        node = child
    node[leaf] = value


def parse_overrides(args: list[str]) -> dict:
    """`--section.key=value` (value parsed as YAML) into a nested dict."""
    tree: dict = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"cannot parse argument {arg!r}: overrides look like --section.key=value")
        dotted, raw = arg[2:].split("=", 1)
        _set_dotted(tree, dotted, _yaml(raw) if raw != "" else "")
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key {key!r}")
        elif e["type"] == "missing":
            lines.append(f"{source}: missing required key {key!r}")
        elif e["type"] == "value_error":  # our own cross-field checks: the message names the keys
            lines.append(f"{source}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{source}: {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _read(path: str | None, overrides: list[str] | None) -> dict:
    """The YAML file's sections with the `--section.key=value` overrides merged in, unvalidated."""
    tree: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ValueError(f"config file {path} does not exist")
        with open(path) as f:
            try:
                tree = _yaml(f) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections")
    return _merge(tree, parse_overrides(overrides or []))


def _validate(tree: dict, source: str) -> RunConfig:
    try:
        # Validated as JSON so that YAML lists fill tuple fields, in strict mode so
        # that "5" is not silently taken for 5 nor 1 for true.
        return RunConfig.model_validate_json(json.dumps(tree), strict=True)
    except ValidationError as e:
        raise ValueError(_format_error(e, source)) from None


def load_config(path: str | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config, apply `--section.key=value` overrides, validate. Raises ValueError."""
    return _validate(_read(path, overrides), path or "command line")


# What a reference cache's values depend on (tools/precompute_ref.py reads these and nothing else;
# the fingerprint of docs/design.md §5 records them). Every other setting of a run config is
# accepted and ignored, so one config file serves the precompute and the training run.
CACHE_SETTINGS = ("seed", "model.family", "model.pretrained_path", "model.denoiser_config", "model.scheduler_config",
                  "model.prediction_type", "model.dtype", "model.vae_scale_factor", "model.flow_shift",
                  "model.sigma_density", "model.logit_mean", "model.logit_std", "model.edm_p_mean", "model.edm_p_std",
                  "data.shards", "data.resolution", "data.timestep_range", "data.empty_prompt_prob",
                  "reference.pretrained_path", "reference.cache_dir")


def load_cache_config(path: str | None, overrides: list[str] | None = None) -> RunConfig:
    """A run config as tools/precompute_ref.py reads it: like `load_config`, but the keys only a
    training run needs (output_dir, train.max_steps) may be left out; placeholders fill them, and
    nothing in the precompute reads them. Unknown keys and wrong types are still errors."""
    tree = _read(path, overrides)
    tree.setdefault("output_dir", "(not used by a reference cache)")
    train = tree.setdefault("train", {})
    if isinstance(train, dict):  # anything else: validation names the bad section
        train.setdefault("max_steps", 1)
    return _validate(tree, path or "command line")


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved configuration (what the run actually used) as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(cfg.model_dump(mode="json"), f, sort_keys=False)


# ---------------------------------------------------------------- DeepSpeed JSON

def training_dtype(cfg: RunConfig, has_gpu: bool, gpu_has_bf16: bool) -> str:
    """The precision the run trains in: `model.dtype`, with auto resolved for this hardware."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    return "bf16" if has_gpu and gpu_has_bf16 else "fp32"


def _fill(ds: dict, dotted: str, wanted: Any, setting: str, source: str) -> None:
    """Fill an "auto" (or absent) DeepSpeed value from the run's config; refuse a contradiction."""
    node = ds
    *parents, leaf = dotted.split(".")
    for name in parents:
        node = node.setdefault(name, {})
    have = node.get(leaf, "auto")
    if have == "auto":
        node[leaf] = wanted
    elif have != wanted and not (isinstance(have, (int, float)) and isinstance(wanted, (int, float)) and float(have) == float(wanted)):
        raise ValueError(
            f"{source}: {dotted} = {have!r} contradicts {setting} = {wanted!r} in the run config; "
            f'set it to "auto" or make them agree'
        )


def resolve_ds_config(path: str, cfg: RunConfig, world_size: int, dtype: str) -> dict:
    """Read a DeepSpeed JSON and fill its "auto" values from the run's config. Raises ValueError."""
    if not os.path.isfile(path):
        raise ValueError(f"DeepSpeed config {path} does not exist")
    try:
        with open(path) as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(ds, dict):
        raise ValueError(f"DeepSpeed config {path} must hold a JSON object")
    t = cfg.train
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size", path)
    _fill(ds, "gradient_accumulation_steps", t.grad_accum, "train.grad_accum", path)
    _fill(ds, "train_batch_size", t.micro_batch_size * t.grad_accum * world_size,
          f"train.micro_batch_size * train.grad_accum * world_size ({world_size})", path)
    _fill(ds, "gradient_clipping", t.grad_clip, "train.grad_clip", path)
    _fill(ds, "bf16.enabled", dtype == "bf16", f"the training dtype ({dtype})", path)
    _fill(ds, "fp16.enabled", dtype == "fp16", f"the training dtype ({dtype})", path)
    if "optimizer" in ds:
        opt = ds["optimizer"]
        o = cfg.optim
        if o.implementation != "auto":
            raise ValueError(f"{path}: the optimizer section builds DeepSpeed's own AdamW; optim.implementation="
                             f"{o.implementation} chooses the kernel of the one the trainer builds: remove either")
        if o.name != "adamw" or str(opt.get("type", "")).lower() not in ("adamw", "adam"):
            raise ValueError(
                f"{path}: optimizer.type = {opt.get('type')!r} contradicts optim.name = {o.name!r}; "
                "remove the optimizer section (the trainer builds optim.name itself) or use AdamW"
            )
        _fill(ds, "optimizer.params.lr", o.peak_lr(ds["train_batch_size"]),
              "optim.lr" + (" x the global batch (optim.scale_lr)" if o.scale_lr else ""), path)
        _fill(ds, "optimizer.params.betas", list(o.betas), "optim.betas", path)
        _fill(ds, "optimizer.params.eps", o.eps, "optim.eps", path)
        _fill(ds, "optimizer.params.weight_decay", o.weight_decay, "optim.weight_decay", path)
    if "scheduler" in ds:
        raise ValueError(f"{path}: remove the scheduler section; the schedule is optim.schedule / optim.warmup_steps")
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload not in ("none", None) and cfg.optim.implementation != "auto":
        raise ValueError(f"{path}: the optimizer state is offloaded to {offload}, where DeepSpeed's CPU Adam "
                         f"runs; optim.implementation={cfg.optim.implementation} is for an optimizer on the device: "
                         "remove it")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (2, 3):
        raise ValueError(f"{path}: zero_optimization.stage must be 2 or 3, got {stage!r}")
    return ds
