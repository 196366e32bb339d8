"""Config composition and its one-line errors, for every command and for ``experiments/``.

``vrmoe train`` composes ``conf/config.yaml`` with Hydra; ``vrmoe eval`` applies its
overrides to a run's saved config; benchmarks and studies compose in code. All of
them go through :func:`load_config`, which merges the composed values into the
typed schemas (the router section into the chosen router's own ``Config``),
checks the names of routers, corpora and tasks against their registries and runs
the range checks. Malformed overrides, unknown keys and unknown group options are
refused by :func:`check_overrides` before Hydra creates a run dir.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import AVERAGED_SAMPLES, HF_NAME_NEEDED, AppConfig, ConfigError, RouterConfig, to_dict, validate
from .data.corpora import CORPORA
from .model.routers import ROUTERS, router_class
from .tasks import TASKS
from .checkpoint import checkpoint_paths, config_from_v1
from .tracking import CHECKPOINT_FILE, SUMMARY_FILE, holds_run_records, read_json, unwritable_reason

CONFIG_GROUPS = ("model", "router", "data", "train", "logger", "task", "eval", "experiment", "hparams_search")
# Where each router's typed schema is stored for Hydra; a router's YAML extends it with
# `defaults: [/router_schema/<name>@_here_, _self_]`.
ROUTER_SCHEMA_GROUP = "router_schema"


def config_dir() -> Path:
    return Path(str(resources.files("vrmoe") / "conf"))


# The user's own presets (conf/config.yaml: hydra.searchpath): ./conf of the working directory.
USER_CONFIG_DIR = Path("conf")


def group_options(group: str) -> list[str]:
    """The options of a config group: its YAML files (packaged, and in ./conf), and for ``router``
    every registered router."""
    options = set()
    for folder in (config_dir() / group, USER_CONFIG_DIR / group):
        options |= {p.stem for p in folder.glob("*.yaml")} if folder.is_dir() else set()
    if group == "router":
        options |= set(ROUTERS)
    return sorted(options)


# ---------------------------------------------------------------------------
# Loading: composed values -> the typed, validated AppConfig
# ---------------------------------------------------------------------------

def _one_line(exc: OmegaConfBaseException) -> str:
    msg = str(exc).strip().splitlines()[0]
    key = getattr(exc, "full_key", None)
    return f"{key}: {msg}" if key and key not in msg else msg


def load_config(cfg: DictConfig | dict[str, Any]) -> AppConfig:
    """Resolve a composed config (or a saved one) and return the validated, typed :class:`AppConfig`."""
    register_resolvers()
    try:
        raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        raw = {k: v for k, v in raw.items() if k not in ("hydra", "experiment", "hparams_search")}
        router_name = str((raw.get("router") or {}).get("name", RouterConfig.name))
        schema = OmegaConf.structured(AppConfig)
        schema.router = OmegaConf.structured(router_class(router_name).Config)
        app: AppConfig = OmegaConf.to_object(OmegaConf.merge(schema, raw))  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ or exc.__context__
        while cause is not None and not isinstance(cause, ConfigError):  # nested interpolations wrap it
            cause = cause.__cause__ or cause.__context__
        if cause is not None:  # raised by a resolver (a model=hf checkpoint that cannot be read)
            raise cause from None
        raise ConfigError(f"invalid config: {_one_line(exc)}") from None
    if app.data.name not in CORPORA:
        raise ConfigError(f"data={app.data.name!r} is unknown; choose one of {', '.join(CORPORA)}")
    if app.task.name not in TASKS:
        raise ConfigError(f"task={app.task.name!r} is unknown; choose one of {', '.join(TASKS)}")
    validate(app)
    return app


def from_dict(raw: dict[str, Any]) -> AppConfig:
    """A config saved in a checkpoint or summary.json, typed and validated again."""
    return load_config(raw)


# ---------------------------------------------------------------------------
# Checking a command line before Hydra sees it
# ---------------------------------------------------------------------------

# Hydra's mutually exclusive modes, as its own parser names them.
_HYDRA_MODES = {"run": "--run", "multirun": "-m/--multirun", "cfg": "--cfg", "info": "--info",
                "shell_completion": "--shell-completion"}


def split_hydra_args(argv: list[str]) -> list[str]:
    """Check ``vrmoe train``'s command line the way Hydra will read it and return its overrides.

    Hydra reports a bad flag combination with a traceback and a malformed override with a
    multi-line message and exit code 1; here each is one ConfigError line instead."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def refuse(message: str) -> None:
        raise ConfigError(f"vrmoe train: {message} (see vrmoe train --help)")

    parser.error = refuse  # type: ignore[method-assign]  # argparse would print its usage and exit
    args = parser.parse_args(argv)
    modes = [flag for name, flag in _HYDRA_MODES.items() if getattr(args, name)]
    if len(modes) > 1:
        raise ConfigError(f"vrmoe train: {' and '.join(modes)} cannot be combined; use one of them "
                          "(e.g. vrmoe train -m K=1,2, or vrmoe train K=1 --cfg job)")
    if args.shell_completion:  # `-sc install=bash`: Hydra's completion commands, not config overrides
        return []
    return list(args.overrides)


def _fields_of(cls: type, prefix: str) -> dict[str, type]:
    """Dotted key -> the dataclass that declares it, for ``cls`` and its nested dataclasses."""
    keys: dict[str, type] = {}
    for f in dataclasses.fields(cls):
        keys[prefix + f.name] = cls
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            keys.update(_fields_of(type(default), f"{prefix}{f.name}."))
    return keys


def schema_keys() -> dict[str, type]:
    """Every dotted key of the typed config (``K``, ``router.k``, ``eval.gammas``, ...), with the
    dataclass that declares it; ``router.<key>`` covers every registered router's own keys."""
    keys = _fields_of(AppConfig, "")
    for cls in ROUTERS.values():
        keys.update({f"router.{f.name}": cls.Config for f in dataclasses.fields(cls.Config)
                     if f"router.{f.name}" not in keys})
    return keys


def check_overrides(overrides: list[str]) -> None:
    """Refuse, before Hydra makes a run dir: malformed overrides, keys the config does not have,
    unknown config-group choices (``router=foo``), a router key the chosen router does not have,
    and a ``train.resume`` with nothing to resume."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    schema = schema_keys()
    parsed_items = []
    for item in overrides:
        try:
            parsed_items.append((item, parser.parse_overrides([item])[0]))
        except OverrideParseException as exc:
            detail = next((line for line in str(exc).splitlines() if not line.startswith(("Error parsing", "See "))),
                          "not an override")
            value = item.split("=", 1)[1] if "=" in item else ""
            if any(ch.isspace() or not ch.isascii() for ch in value):
                key = item.split("=", 1)[0]
                raise ConfigError(f"{item!r}: a value with spaces or non-ASCII characters must be quoted: "
                                  f"{key}='{value}' (in a shell: \"{key}='{value}'\")") from None
            raise ConfigError(f"{item!r}: {detail}; overrides are key=value, e.g. K=2 or router=variational") from None
    chosen_routers = [RouterConfig.name]
    for item, parsed in parsed_items:
        if parsed.key_or_group == "router" and "=" in item:
            chosen_routers = [c for c in item.split("=", 1)[1].split(",") if c]
    for item, parsed in parsed_items:
        key = parsed.key_or_group
        if key.startswith("hydra") or parsed.is_delete() or "=" not in item:
            continue
        value = item.split("=", 1)[1]
        if key in CONFIG_GROUPS:
            options = group_options(key)
            for choice in value.split(","):  # a multirun sweep lists several
                if choice and choice != "null" and choice not in options:
                    raise ConfigError(f"{key}={choice!r} is unknown; choose one of {', '.join(options)}")
            continue
        if key not in schema:
            close = difflib.get_close_matches(key, sorted(schema), n=1)
            hint = f"did you mean {close[0]}?" if close else "vrmoe train --cfg job lists every key"
            raise ConfigError(f"{key}={value}: {key} is not a config key; {hint}")
        if key.startswith("router."):
            _check_router_key(key, value, chosen_routers)
        _check_type(parsed, key, schema[key])
        if key == "train.resume" and value not in ("", "null"):
            # A run stopped before its first checkpoint still has its records: it starts again there.
            if not checkpoint_paths(Path(value).expanduser()) and not holds_run_records(Path(value).expanduser()):
                raise ConfigError(f"train.resume={value}: no {CHECKPOINT_FILE} there; "
                                  "point it at the run dir of an interrupted run")
    # A fresh run never takes over a dir that holds a run: refused before Hydra writes its record there.
    values = {p.key_or_group: item.split("=", 1)[1] for item, p in parsed_items if "=" in item}
    run_dir = values.get("hydra.run.dir")
    if run_dir and (reason := unwritable_reason(Path(run_dir).expanduser().parent)):
        raise ConfigError(f"hydra.run.dir={run_dir} cannot be written ({reason}); choose a writable directory")
    if run_dir and values.get("train.resume") in (None, "", "null") and (Path(run_dir) / SUMMARY_FILE).exists():
        raise ConfigError(f"hydra.run.dir={run_dir} already holds a run; choose another dir, or continue it "
                          f"with train.resume={run_dir}")


def _check_router_key(key: str, value: str, chosen: list[str]) -> None:
    field_name = key.split(".", 1)[1]
    known = [name for name in chosen if name in ROUTERS]
    owners = [name for name in known if field_name in {f.name for f in dataclasses.fields(ROUTERS[name].Config)}]
    if known and not owners:
        having = [name for name, cls in ROUTERS.items() if field_name in {f.name for f in dataclasses.fields(cls.Config)}]
        raise ConfigError(f"{key}={value}: router={','.join(known)} has no key {field_name} "
                          f"(it belongs to router={'/'.join(having)})")


def _check_type(parsed, key: str, declared_in: type) -> None:
    """A value of the wrong type (``train.max_steps=abc``), each value of a sweep checked."""
    values = list(parsed.sweep_string_iterator()) if parsed.is_sweep_override() \
        else [parsed.get_value_element_as_str()]
    for value in values:
        if "${" in value:  # an interpolation is checked once resolved
            continue
        try:
            if key.startswith("router."):
                OmegaConf.merge(OmegaConf.structured(declared_in),
                                OmegaConf.from_dotlist([f"{key.split('.', 1)[1]}={value}"]))
            else:
                OmegaConf.merge(OmegaConf.structured(AppConfig), OmegaConf.from_dotlist([f"{key}={value}"]))
        except OmegaConfBaseException as exc:
            reason = str(exc).strip().splitlines()[0]
            raise ConfigError(f"{key}={value}: {reason}") from None


# ---------------------------------------------------------------------------
# Hydra
# ---------------------------------------------------------------------------

def _hf_config_value(name: str | None, key: str):
    from .model.hf import config_value

    if name is None or str(name) in ("", "???"):  # not set: the schema's None, or the YAML's ???
        raise ConfigError(HF_NAME_NEEDED)
    return config_value(str(name), str(key))


def _launch_time(pattern: str) -> str:
    from .distributed import launch_time

    return launch_time().strftime(pattern)


def balance_weight_default(freeze: str) -> float:
    """The paper trains post-hoc heads on ``L_task + beta * KL`` alone: a frozen pretrained router was
    never asked to balance load, so with train.freeze=backbone the Switch balance loss is off unless set."""
    return 0.0 if str(freeze) == "backbone" else RouterConfig.load_balance_weight


def default_samples(router_name: str) -> int:
    """S when the command line gives none: the method's S for a router that averages routing
    samples at evaluation (one sample is a single draw, not the method), 1 for the others."""
    try:
        averages = router_class(str(router_name)).Config().samples_at_eval()
    except ConfigError:  # an unknown router is refused with its own line when the config is loaded
        return 1
    return AVERAGED_SAMPLES if averages else 1


def native_vocab_size(tokenizer: str, data_vocab_size: int) -> int:
    """The native model's vocabulary when the command line gives none: the tokenizer's (256 bytes,
    or the BPE's data.vocab_size), so ``data.tokenizer=bpe`` needs no second key to match it."""
    return int(data_vocab_size) if str(tokenizer) == "bpe" else 256


def register_resolvers() -> None:
    """The resolvers the YAML files use (registered once per process)."""
    if not OmegaConf.has_resolver("vrmoe_hf"):
        # model=hf: shape values read off the checkpoint's own config.
        OmegaConf.register_new_resolver("vrmoe_hf", _hf_config_value)
    if not OmegaConf.has_resolver("vrmoe_now"):
        # The run dir's time: rank 0's under torchrun, so every rank writes into one dir.
        OmegaConf.register_new_resolver("vrmoe_now", _launch_time, use_cache=True)
    if not OmegaConf.has_resolver("vrmoe_run_dir"):
        # A resumed run continues in its own directory instead of a new one.
        OmegaConf.register_new_resolver("vrmoe_run_dir", lambda resume, default: resume or default)
    if not OmegaConf.has_resolver("vrmoe_default_samples"):
        OmegaConf.register_new_resolver("vrmoe_default_samples", default_samples)
    if not OmegaConf.has_resolver("vrmoe_balance_weight"):
        OmegaConf.register_new_resolver("vrmoe_balance_weight", balance_weight_default)
    if not OmegaConf.has_resolver("vrmoe_vocab_size"):
        OmegaConf.register_new_resolver("vrmoe_vocab_size", native_vocab_size)
    if not OmegaConf.has_resolver("vrmoe_job_dirname"):
        OmegaConf.register_new_resolver("vrmoe_job_dirname", job_dirname)


def prepare_hydra() -> None:
    """Register what the configs need before Hydra composes them (in every process that composes)."""
    register_resolvers()
    # ./conf is searched when it exists; most working directories have none, which is no news.
    warnings.filterwarnings("ignore", message=r"provider=hydra\.searchpath in main, path=conf is not available")
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    # The typed schema is the base of config.yaml; each router's YAML extends its own schema.
    store.store(name="vrmoe_schema", node=AppConfig)
    yaml_routers = {p.stem for p in (config_dir() / "router").glob("*.yaml")}
    for name, cls in ROUTERS.items():
        store.store(group=ROUTER_SCHEMA_GROUP, name=name, node=cls.Config)
        if name not in yaml_routers:  # a router registered in code needs no YAML file
            store.store(group="router", name=name, node=cls.Config)


MAX_JOB_DIRNAME = 120


def job_dirname(job_num: Any, overrides: Any) -> str:
    """A sweep job's directory name, ``<job number>_<its overrides>``; a long one (an Optuna trial's
    float values, many swept keys) is cut and keeps a hash of the whole, as file names have a limit."""
    name = f"{job_num}_{overrides}" if overrides not in (None, "") else str(job_num)
    if len(name) <= MAX_JOB_DIRNAME:
        return name
    digest = hashlib.sha1(str(overrides).encode("utf-8")).hexdigest()[:8]
    return f"{name[:MAX_JOB_DIRNAME - 9]}_{digest}"


def compose_config(overrides: Iterable[str]) -> AppConfig:
    """The validated config that ``vrmoe train`` would build from these overrides."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides)
    check_overrides(overrides)
    prepare_hydra()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="vrmoe.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return load_config(cfg)


# ---------------------------------------------------------------------------
# A saved run's config with new settings (vrmoe eval)
# ---------------------------------------------------------------------------

# The top-level knobs interpolated into the router section at training time: a saved config
# holds the resolved values, so a knob given later sets the router key it feeds.
KNOB_KEYS = {"K": "router.k", "S": "router.samples", "T": "router.temperature", "beta": "router.beta"}


def compose_over_saved(saved: dict[str, Any] | AppConfig, overrides: Iterable[str],
                       allowed: tuple[str, ...] = (), what: str = "a setting here") -> AppConfig:
    """``saved`` (a run's config) with ``overrides`` applied and validated, with the same checks and
    one-line errors as ``vrmoe train``. Group options (``model=tiny``) replace their section with
    the option's YAML; ``allowed`` (keys, and prefixes ending in ".") limits what may change."""
    overrides = list(overrides)
    base = to_dict(saved) if isinstance(saved, AppConfig) else saved
    router_name = str(base.get("router", {}).get("name", RouterConfig.name))
    check_overrides([*overrides, f"router={router_name}"] if not any(o.startswith("router=") for o in overrides)
                    else overrides)
    cfg = OmegaConf.create(base)
    for item in overrides:
        key, value = item.split("=", 1)
        if allowed and not any(key == a or (a.endswith(".") and key.startswith(a)) for a in allowed):
            raise ConfigError(f"{key}={value}: not {what}; allowed: {', '.join(allowed)}")
        if key in CONFIG_GROUPS:
            packaged = config_dir() / key / f"{value}.yaml"
            node = OmegaConf.load(packaged if packaged.is_file() else USER_CONFIG_DIR / key / f"{value}.yaml")
            cfg[key] = {k: v for k, v in OmegaConf.to_container(node).items() if k != "defaults"}
            continue
        parsed = OmegaConf.from_dotlist([item])
        if key in KNOB_KEYS and KNOB_KEYS[key].split(".")[1] in cfg.router:  # a knob the router has no key for
            OmegaConf.update(cfg, KNOB_KEYS[key], parsed[key])               # changes nothing, as in training
        cfg = OmegaConf.merge(cfg, parsed)
    return load_config(OmegaConf.to_container(cfg))


def saved_run_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The config a run was made with, read from its run dir: its newest loadable checkpoint's (only
    the config is read: tensors are mapped, not loaded), else its summary.json's, else Hydra's
    record (.hydra/config.yaml) of a run stopped before it wrote either; None when there is none."""
    run_dir = Path(run_dir).expanduser()
    for path in checkpoint_paths(run_dir) if run_dir.is_dir() else []:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception:  # unreadable: the next one, as a resume does
            continue
        if isinstance(state, dict) and isinstance(state.get("config"), dict):
            return state["config"] if int(state.get("version", 1)) >= 2 else config_from_v1(state["config"])
    config = (read_json(run_dir / SUMMARY_FILE) or {}).get("config")
    if isinstance(config, dict):
        return config
    record = run_dir / ".hydra" / "config.yaml"
    if record.is_file():
        try:
            return to_dict(load_config(OmegaConf.load(record)))
        except Exception:  # a damaged record: as if there were none
            return None
    return None


# Overrides that cannot be applied to a saved config key by key: presets that set keys anywhere,
# and Hydra's additions and deletions.
_COMPOSED_ONLY = ("+", "~", "experiment=", "hparams_search=")


def load_job_config(cfg: DictConfig, overrides: list[str]) -> AppConfig:
    """The config of a ``vrmoe train`` job. A resume (``train.resume=<dir>``) takes the config its
    run was made with from the run dir (:func:`saved_run_config`) with the
    command line's overrides on top, so the command a run prints to resume it runs as printed,
    without the run's own overrides; a key given is then checked against the run like any other
    (the resume refuses a change of what it trains). A resume whose run dir holds no config, or
    whose overrides only Hydra can apply (``experiment=``, ``+key``), takes Hydra's composition."""
    resume = OmegaConf.select(cfg, "train.resume")
    saved = saved_run_config(resume) if resume else None
    if saved is None or any(o.startswith(_COMPOSED_ONLY) for o in overrides):
        return load_config(cfg)
    saved_router = str(saved.get("router", {}).get("name", RouterConfig.name))
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "router" and value != saved_router:  # another router's section is not this run's to merge
            raise ConfigError(f"train.resume={resume}: the run was made with another model or router "
                              f"(router={saved_router}); resume with its own config")
    return compose_over_saved(saved, [o for o in overrides if not o.startswith("router=")])


__all__ = ["CONFIG_GROUPS", "config_dir", "group_options", "load_config", "from_dict", "split_hydra_args",
           "check_overrides", "schema_keys", "prepare_hydra", "compose_config", "compose_over_saved", "load_job_config",
           "saved_run_config", "KNOB_KEYS"]
