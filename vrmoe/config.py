"""Typed configuration schemas and validation.

Hydra composes YAML from ``vrmoe/conf`` over these schemas; ``vrmoe.compose``
resolves the interpolations (``${K}``, ``${S}``, ...) and merges every section
into them (the router section into the chosen router's own dataclass), so a
value of the wrong type or an unknown key is refused. Range checks follow, each
raising :class:`ConfigError` with one line that names the key, what was given
and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from omegaconf import OmegaConf


class ConfigError(ValueError):
    """A user-facing configuration problem; the message is one line."""


@dataclass
class ModelConfig:
    name: str = "small"
    # Which implementation builds the model (vrmoe.model.BACKBONES); the rest describes its shape.
    backbone: str = "native"
    vocab_size: int = 256
    # Tokens per training window (model=hf: per fine-tuning prompt).
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    # Routed experts per MoE layer.
    n_experts: int = 8
    # Hidden width of each expert's MLP.
    expert_hidden: int = 256
    # Every `moe_every`-th block has an MoE feed-forward; 0 makes a dense model.
    moe_every: int = 1
    dense_hidden: int = 512
    dropout: float = 0.0
    # Expert dispatch kernel: "auto" picks grouped_mm on CUDA in bf16, a loop over experts otherwise.
    dispatch: str = "auto"
    # Experts per token the model is made with; the knob K follows it unless set.
    top_k: int = 2
    # Shared experts per MoE layer (DeepSeek's n_shared_experts): one always-on SwiGLU of width
    # n_shared_experts * expert_hidden beside the routed experts; 0: none. model=hf keeps its checkpoint's.
    n_shared_experts: int = 0
    # model=hf: a Hugging Face hub id or a local directory written by save_pretrained.
    hf_name: Optional[str] = None


@dataclass
class RouterConfig:
    """The keys every router shares. Each router extends this with its own keys and checks
    (``Router.Config`` in ``vrmoe/model/routers/``); the composed config holds the chosen
    router's dataclass."""

    name: str = "topk"
    k: int = 2
    # S: Monte-Carlo routing samples averaged (before Top-K) at evaluation.
    samples: int = 1
    # Switch balance loss weight: 0.01, or 0 with train.freeze=backbone (the paper's post-hoc objective).
    load_balance_weight: float = 0.01
    # Router z-loss weight (penalises large logits).
    z_loss_weight: float = 0.0
    # Which MoE layers get this router: "all", N for the last N MoE layers, or a list of MoE layer
    # indices counted from 0, the first MoE layer ([12], [0,8,16,24]); the others keep deterministic
    # Top-K. Any: structured configs have no unions; __post_init__ and check() hold it to these forms.
    layers: Any = "all"
    # How logits become expert scores: softmax over the experts (the paper), or sigmoid, each expert on
    # its own (DeepSeek-V3, GLM-4.5, Moonlight); every router samples and averages scores of this kind.
    scoring_func: str = "softmax"
    # The K selected scores are rescaled to sum to 1 (the gates); false hands the experts the scores as
    # they are (DeepSeek-V2, Qwen1.5-MoE).
    norm_topk_prob: bool = True
    # A factor on the gates (DeepSeek's routed_scaling_factor).
    routed_scaling_factor: float = 1.0
    # Grouped selection: the experts form n_group equal groups, the topk_group best groups stay and
    # the K experts are chosen inside them (a group's score is its best score under softmax, as in
    # DeepSeek-V2, and the sum of its best two under sigmoid, as in DeepSeek-V3). 1: no groups.
    n_group: int = 1
    # The expert groups kept for selection (router.n_group), the best first; K must fit in them.
    topk_group: int = 1
    # Auxiliary-loss-free balancing (DeepSeek-V3's bias update speed): after every training step each
    # expert's selection bias moves by this much towards balance (up if it took fewer than the mean
    # load, down if more). The bias is added to the scores for selection only, never to the gates, and
    # checkpoints store it. 0: off (a sigmoid router still selects with the bias it loaded).
    bias_update_speed: float = 0.0

    def __post_init__(self) -> None:
        self.layers = canonical_layers(self.layers)

    def check(self, model: ModelConfig) -> None:
        """Range checks of the shared keys; a router's own ``check`` extends this."""
        _require(1 <= self.k <= model.n_experts,
                 f"K={self.k} is out of range; it must be in [1, {model.n_experts}] (model.n_experts={model.n_experts})")
        _require(self.samples >= 1, f"S={self.samples} is out of range; it must be a positive integer")
        _require(self.load_balance_weight >= 0 and self.z_loss_weight >= 0,
                 "router.load_balance_weight and router.z_loss_weight must be >= 0")
        _require(layers_form_ok(self.layers),
                 f"router.layers={layers_text(self.layers)} must be all, a positive integer N (the last N MoE "
                 "layers) or a list of MoE layer indices, e.g. router.layers=[0,2]")
        if self.name != "topk":
            _require(model.moe_every > 0, f"router={self.name} needs MoE layers, but model.moe_every=0 builds none")
        _require(self.scoring_func in ("softmax", "sigmoid"),
                 f"router.scoring_func={self.scoring_func!r} must be softmax or sigmoid")
        _require(self.routed_scaling_factor > 0,
                 f"router.routed_scaling_factor={self.routed_scaling_factor} must be > 0")
        _require(self.bias_update_speed >= 0,
                 f"router.bias_update_speed={self.bias_update_speed} must be >= 0 (0 turns the bias updates off)")
        n_group, topk_group = self.n_group, self.topk_group
        _require(n_group >= 1 and model.n_experts % n_group == 0,
                 f"router.n_group={n_group} must divide model.n_experts={model.n_experts} into equal groups "
                 "(1: no groups)")
        _require(1 <= topk_group <= n_group,
                 f"router.topk_group={topk_group} is out of range; it must be in [1, router.n_group={n_group}]")
        _require(self.k <= topk_group * (model.n_experts // n_group),
                 f"K={self.k} experts do not fit in router.topk_group={topk_group} group(s) of "
                 f"{model.n_experts // n_group}; raise router.topk_group or lower K")
        if model.backbone != "hf":  # model=hf learns its scoring from the checkpoint, checked there
            self.check_scoring()

    def check_scoring(self) -> None:
        """Checks of a router's own keys against ``scoring_func`` (a router with such keys extends it)."""

    def samples_at_eval(self) -> bool:
        """Whether evaluation averages S routing samples, so that S changes its result and cost."""
        return False

    def draws_at_eval(self) -> bool:
        """Whether evaluation draws routes at random, so that the S single-sample passes of the
        BMA and mutual information differ (a router that averages samples does too)."""
        return self.samples_at_eval()

    def knobs_read(self) -> set[str]:
        """The top-level knobs this router reads: K always; S when evaluation draws routes; T and
        beta when the router has the key they feed (``temperature``, ``beta``)."""
        names = {f.name for f in fields(self)}
        return ({"K"} | ({"S"} if self.draws_at_eval() else set())
                | ({"T"} if "temperature" in names else set()) | ({"beta"} if "beta" in names else set()))

    def shared(self) -> dict[str, Any]:
        """The shared keys' values (what a Top-K router on the other layers takes)."""
        return {f.name: getattr(self, f.name) for f in fields(RouterConfig) if f.name != "name"}


def canonical_layers(layers: Any) -> Any:
    """``router.layers`` in the one form a run records: "all", N as a digit string (as runs have
    always saved it, so a checkpoint compares equal on resume whether N came from the command
    line as a number or from a record), or a plain list of indices. Anything else is left for
    ``RouterConfig.check`` to refuse."""
    if isinstance(layers, int) and not isinstance(layers, bool):
        return str(layers)
    if isinstance(layers, (list, tuple)) or OmegaConf.is_list(layers):
        return list(layers)
    return layers


def layers_form_ok(layers: Any) -> bool:
    """Whether ``router.layers`` is "all", a positive N or a non-empty list of integers (the
    indices are checked against the model's MoE layers where the model is built)."""
    if isinstance(layers, list):
        return bool(layers) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
    return layers == "all" or (isinstance(layers, str) and layers.isdigit() and int(layers) >= 1)


def layers_text(layers: Any) -> str:
    """``router.layers`` as it is written on the command line (a list as ``[0,2]``)."""
    return f"[{','.join(map(str, layers))}]" if isinstance(layers, list) else str(layers)


@dataclass
class DataConfig:
    name: str = "stdlib_docs"
    # data=text: a file or a directory of text files.
    path: Optional[str] = None
    # data=hf: a dataset name on the Hub, or a local `save_to_disk` directory.
    hf_name: Optional[str] = None
    hf_split: str = "train"
    hf_text_field: str = "text"
    val_fraction: float = 0.05
    # data=mcq: a multiple-choice dataset (openbookqa, arc_easy, arc_challenge, sciq, medmcqa, mmlu, a hub
    # id, a save_to_disk directory, a .jsonl/.parquet file or a directory of <split>.jsonl files).
    mcq_name: Optional[str] = None
    mcq_train_split: str = "train"
    mcq_eval_split: str = "validation"
    # The calibration split (post-hoc heads and temperature scaling fit on it); null sets aside the
    # last fifth of mcq_train_split's questions, which fine-tuning then never sees.
    mcq_calibration_split: Optional[str] = None
    # Where prepared corpora are cached; null means ~/.cache/vrmoe (or $VRMOE_CACHE).
    cache_dir: Optional[str] = None
    # The native model's tokenizer: bytes (256 tokens), or bpe: a byte-level BPE of vocab_size tokens
    # trained on the training split (cached beside the corpora; the native model's vocabulary follows it).
    tokenizer: str = "bytes"
    vocab_size: int = 4096


@dataclass
class TrainConfig:
    max_steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Steps in a row with a non-finite loss or gradient (each skipped) before the run stops as diverged.
    max_bad_steps: int = 3
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 200
    # Checkpoints kept (the newest is checkpoint.pt, the one before checkpoint.1.pt, ...): a resume
    # falls back to an older one when the newest is unreadable.
    keep_checkpoints: int = 2
    # Continue an interrupted run in its own directory (with its own training settings, unless
    # resume_override=true, which is recorded in the summary).
    resume: Optional[str] = None
    resume_override: bool = False
    # Start from another run's weights (the post-hoc protocol).
    init_from: Optional[str] = None
    # "none" trains everything; "backbone" trains only parameters new to this run.
    freeze: str = "none"
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    # Under torchrun: ddp (DistributedDataParallel). fsdp (sharding a backbone too large for one device)
    # is not available yet.
    distributed: str = "ddp"
    # A top-level knob (T, S, beta) given on the command line that the chosen router does not read is
    # said in one line and recorded in summary.json; strict_knobs=true refuses the run instead.
    strict_knobs: bool = False
    # What the job returns to a sweeper (the Optuna sweeper minimises or maximises it): val_loss, or a
    # metric of `vrmoe eval` (ece, mcq_ece, auroc_far, ...: vrmoe.eval.schema.METRICS) with eval.at_end=true.
    objective: str = "val_loss"


@dataclass
class LoggerConfig:
    name: str = "wandb"
    project: str = "vrmoe"
    entity: Optional[str] = None
    # offline needs no account; `wandb sync` uploads later. Set online to stream.
    mode: str = "offline"
    # Seconds W&B may take to start (online: to reach its server) before the run goes on without it.
    init_timeout: float = 10.0
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class TaskConfig:
    # lm: next-token prediction; mcq: 4-way multiple choice (see vrmoe/data/mcq.py).
    name: str = "lm"
    # mcq: the items trained on, from the split fit_split names (epochs = max_steps * batch_size /
    # train_items), and val_items held-out items of the calibration split (val/loss, val/accuracy).
    # null: every question of a dataset's split, or 2000 items made from text, and 256 to validate;
    # fitting on the calibration split (of a dataset or of text) holds its last val_items out, by
    # default a fifth of it up to 256, and fits on the rest.
    train_items: Optional[int] = None
    val_items: Optional[int] = None
    # mcq: longest cloze sentence in bytes (capped at model.seq_len).
    item_len: int = 64
    # The form of multiple-choice items: cloze (softmax over the four filled-in sentences'
    # log-likelihoods) or letter (the options lettered A-D in the prompt, softmax over the four
    # letters' logits at the answer: the paper's form); auto: cloze for text corpora, letter for
    # data=mcq. task=mcq trains on such items; vrmoe eval scores them whatever the task.
    format: str = "auto"
    # mcq: the split trained on: finetune (fine-tuning a base model) or calibration (post-hoc heads
    # fit on items the base never saw). The test split is only ever scored by vrmoe eval.
    fit_split: str = "finetune"

    def resolved_format(self, data: "DataConfig") -> str:
        if self.format != "auto":
            return self.format
        return "letter" if data.name == "mcq" else "cloze"


PAPER_GAMMAS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05]


@dataclass
class EvalConfig:
    # Run `vrmoe eval` on the final checkpoint when training ends.
    at_end: bool = False
    # Next-token calibration and LM-level OOD scores use this many windows of each text.
    windows: int = 64
    # Multiple-choice items scored of each set (the test split, MCQ-level OOD sets); null: every item.
    mcq_items: Optional[int] = None
    batch_size: int = 16
    # Per-sequence OOD scores on "lm" windows or "mcq" items; auto follows the run's task.
    ood_task: str = "auto"
    # Extra OOD sets: text files, each scored against the validation split under its file name, or
    # built-in corpora by name (their validation split; thirdparty_docs: near-OOD prose).
    ood_text: list[str] = field(default_factory=list)
    # With data=mcq: other multiple-choice datasets as OOD sets, each in data.mcq_eval_split or the split
    # it names (e.g. [arc_easy,medmcqa:test]; items without answers are scored for OOD all the same).
    ood_mcq: list[str] = field(default_factory=list)
    # Routing stability: embedding noise sigma = gamma * mean token-embedding norm.
    gammas: list[float] = field(default_factory=lambda: list(PAPER_GAMMAS))
    stability_windows: int = 16
    # Also measure stability with fresh router sampling noise in the noisy pass.
    stability_unmatched: bool = True
    # Multiple-choice predictives scored: routing_mean (the paper's single pass, routing averaged over
    # S samples before Top-K), bma (the mean of S single-sample passes' predictions) or both.
    predictive: str = "both"
    # Temperature scaling fits its temperature on this many items of the calibration split; null: every item.
    calibration_items: Optional[int] = None


@dataclass
class AppConfig:
    # Experts per token (the model's own by default).
    K: int = 2
    # Routing samples at evaluation: 8 for a router that averages them (variational, mc_dropout, swag), else 1.
    S: int = 1
    # Routing temperature: every sampled routing distribution is softmax(l / T) (temperature,
    # variational, mc_dropout, swag); T < 1 sharpens, T > 1 softens.
    T: float = 1.0
    # Weight of the KL term (router=variational).
    beta: float = 0.01
    # Seeds the weights, the batches and the routing noise.
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


MAX_SEED = 1 << 40
# S by default for a router that averages routing samples at evaluation (the study's S).
AVERAGED_SAMPLES = 8
HF_NAME_NEEDED = "model=hf needs model.hf_name=<hub id or local directory>"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(c: AppConfig) -> None:
    """Range checks; each failure names the key and what is allowed. The router checks its own
    keys; the names of routers, corpora and tasks are checked against their registries where
    the config is loaded (``vrmoe.compose``)."""
    m, t, d = c.model, c.train, c.data
    # inf passes a "> 0" check and NaN a key without one: one rule for every number of the config.
    for key, value in dotted_keys(to_dict(c)).items():
        values = value if isinstance(value, list) else [value]
        _require(all(math.isfinite(v) for v in values if isinstance(v, float)),
                 f"{key}={value} is out of range; it must be a finite number")
    # Seeds of derived streams are seed * 1,000,003 + index, which torch takes up to 2^63.
    _require(abs(c.seed) < MAX_SEED, f"seed={c.seed} is out of range; it must be an integer below 2^40 in size")
    for key, value in (("model.d_model", m.d_model), ("model.n_layers", m.n_layers),
                       ("model.n_heads", m.n_heads), ("model.seq_len", m.seq_len),
                       ("model.n_experts", m.n_experts), ("model.expert_hidden", m.expert_hidden)):
        _require(value >= 1, f"{key}={value} must be a positive integer")
    if m.backbone == "native":  # a pretrained backbone keeps its checkpoint's attention
        _require(m.d_model % m.n_heads == 0 and (m.d_model // m.n_heads) % 2 == 0,
                 f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads} into an even head size")
    _require(m.backbone != "hf" or bool(m.hf_name), HF_NAME_NEEDED)
    _require(m.moe_every >= 0, f"model.moe_every={m.moe_every} must be >= 0 (0 = no MoE layers)")
    _require(m.n_shared_experts >= 0, f"model.n_shared_experts={m.n_shared_experts} must be >= 0 (0 = none)")
    if m.backbone == "hf":  # a pretrained family routes and shares experts as its checkpoint says
        given = [f"{section}.{key}={str(getattr(where, key)).lower()}" for section, where, key, default in (
            ("model", m, "n_shared_experts", 0), ("router", c.router, "scoring_func", "softmax"),
            ("router", c.router, "norm_topk_prob", True), ("router", c.router, "routed_scaling_factor", 1.0),
            ("router", c.router, "n_group", 1), ("router", c.router, "topk_group", 1))
            if getattr(where, key) != default]
        _require(not given, f"{given[0] if given else ''} is for the native model; model=hf scores, groups and "
                 "scales as its checkpoint's family does and keeps its shared experts: drop it")
    _require(0 <= m.dropout < 1, f"model.dropout={m.dropout} must be in [0, 1)")
    _require(m.dispatch in ("auto", "loop", "grouped_mm"),
             f"model.dispatch={m.dispatch!r} must be one of auto, loop, grouped_mm")
    _require(c.T > 0, f"T={c.T} is out of range; it must be > 0")
    _require(c.beta >= 0, f"beta={c.beta} is out of range; it must be >= 0")
    c.router.check(m)
    _require(t.max_steps >= 1, f"train.max_steps={t.max_steps} must be a positive integer")
    # SWAG collects nothing before its warm-up ends: a run that never gets there is Top-K in disguise.
    swag_start = getattr(c.router, "swag_start", None)
    _require(swag_start is None or swag_start < t.max_steps,
             f"router.swag_start={swag_start} is not below train.max_steps={t.max_steps}: no iterate would be "
             "collected and evaluation would be plain Top-K; lower router.swag_start or train more steps")
    _require(t.batch_size >= 1, f"train.batch_size={t.batch_size} must be a positive integer")
    _require(t.lr > 0, f"train.lr={t.lr} must be > 0")
    _require(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be >= 0")
    _require(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    _require(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be >= 0")
    _require(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)")
    _require(t.keep_checkpoints >= 1, f"train.keep_checkpoints={t.keep_checkpoints} must be a positive integer")
    _require(t.max_bad_steps >= 1, f"train.max_bad_steps={t.max_bad_steps} must be a positive integer")
    for key, value in (("train.log_every", t.log_every), ("train.eval_every", t.eval_every),
                       ("train.eval_batches", t.eval_batches), ("train.ckpt_every", t.ckpt_every)):
        _require(value >= 1, f"{key}={value} must be a positive integer")
    _require(t.freeze in ("none", "backbone"), f"train.freeze={t.freeze!r} must be none or backbone")
    _require(t.freeze == "none" or t.init_from is not None or m.backbone == "hf",
             "train.freeze=backbone needs train.init_from=<run dir> (a trained model to freeze)")
    _require(t.distributed in ("ddp", "fsdp"), f"train.distributed={t.distributed!r} must be ddp or fsdp")
    _require(t.distributed == "ddp", "train.distributed=fsdp is not available yet: sharded weights (FSDP2 "
             "fully_shard) are not supported; use train.distributed=ddp with a backbone that fits on one device")
    _require(t.precision in ("fp32", "bf16"), f"train.precision={t.precision!r} must be fp32 or bf16")
    _require(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
             f"train.device={t.device!r} must be auto, cpu or cuda[:N]")
    _require(0 < d.val_fraction < 0.5, f"data.val_fraction={d.val_fraction} must be in (0, 0.5)")
    _require(d.tokenizer in ("bytes", "bpe"), f"data.tokenizer={d.tokenizer!r} must be bytes or bpe")
    _require(d.tokenizer == "bytes" or m.backbone == "native",
             "data.tokenizer=bpe is for the native model; model=hf reads text with its checkpoint's own tokenizer")
    _require(d.tokenizer == "bytes" or d.vocab_size > 256,
             f"data.vocab_size={d.vocab_size} must be above 256 (the 256 bytes are tokens of it)")
    _require(d.tokenizer == "bytes" or m.vocab_size >= d.vocab_size,
             f"model.vocab_size={m.vocab_size} is smaller than data.vocab_size={d.vocab_size} (data.tokenizer=bpe); "
             f"set model.vocab_size={d.vocab_size}")
    _require(d.name != "text" or bool(d.path), "data=text needs data.path=<file or directory>")
    _require(d.name != "hf" or bool(d.hf_name),
             "data=hf needs data.hf_name=<dataset name or save_to_disk directory>")
    _require(d.name != "mcq" or bool(d.mcq_name),
             "data=mcq needs data.mcq_name=<openbookqa, arc_easy, ..., a hub id, a directory or a .jsonl file>")
    _require(not c.eval.ood_mcq or d.name == "mcq",
             "eval.ood_mcq compares multiple-choice datasets; it needs data=mcq data.mcq_name=...")
    for key, value in (("eval.windows", c.eval.windows), ("eval.batch_size", c.eval.batch_size),
                       ("eval.stability_windows", c.eval.stability_windows)):
        _require(value >= 1, f"{key}={value} must be a positive integer")
    for key, value in (("task.train_items", c.task.train_items), ("task.val_items", c.task.val_items),
                       ("eval.mcq_items", c.eval.mcq_items), ("eval.calibration_items", c.eval.calibration_items)):
        _require(value is None or value >= 1, f"{key}={value} must be a positive integer, or null (the default)")
    _require(c.task.format in ("auto", "cloze", "letter"),
             f"task.format={c.task.format!r} must be auto, cloze or letter")
    _require(c.task.resolved_format(d) == "letter" or d.name != "mcq",
             "task.format=cloze needs a text corpus; data=mcq questions are asked in the letter format")
    _require(c.task.fit_split in ("finetune", "calibration"),
             f"task.fit_split={c.task.fit_split!r} must be finetune or calibration")
    _require(c.eval.predictive in ("routing_mean", "bma", "both"),
             f"eval.predictive={c.eval.predictive!r} must be routing_mean, bma or both")
    _require(d.mcq_calibration_split is None or d.mcq_calibration_split != d.mcq_eval_split,
             f"data.mcq_calibration_split and data.mcq_eval_split are both {d.mcq_eval_split!r}; calibration "
             "and test items must be disjoint: name another split, or null to set aside part of the train split")
    _require(c.task.item_len >= 16, f"task.item_len={c.task.item_len} must be >= 16 bytes (a sentence around the blank)")
    _require(c.eval.ood_task in ("auto", "lm", "mcq"), f"eval.ood_task={c.eval.ood_task!r} must be auto, lm or mcq")
    _require(all(g >= 0 for g in c.eval.gammas),
             f"eval.gammas={c.eval.gammas}: every noise scale gamma must be >= 0 (0 is the noise-free pass)")
    _require(c.logger.name in ("wandb", "none"), f"logger={c.logger.name!r} must be wandb or none")
    _require(c.logger.init_timeout > 0, f"logger.init_timeout={c.logger.init_timeout} must be > 0 seconds")
    _require(c.logger.mode in ("offline", "online", "disabled"),
             f"logger.mode={c.logger.mode!r} must be offline, online or disabled")


def to_dict(app: AppConfig) -> dict[str, Any]:
    """Plain-dict form for records (summary.json, checkpoints, W&B)."""
    return OmegaConf.to_container(OmegaConf.structured(app))  # type: ignore[return-value]


def dotted_keys(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as one level of dotted keys (``train.lr``): its leaves only."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(dotted_keys(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out
