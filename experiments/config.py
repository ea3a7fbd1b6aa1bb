"""The ablation config: a YAML file parsed into the dataclasses below and checked before anything
trains. An unknown field, rule, memory configuration or task, `topk > num_slots`, a missing text file
or a wrong type raises `ValueError` naming the field by its path (e.g. `tasks.mqar.train.steps`).
`configs/*.yaml` are the presets (`--preset NAME`)."""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import yaml

from memplug.registry import resolve_backend
from memplug.rules import BUILT_IN_RULES, get_rule

from .model import MEMORIES, ModelConfig, build_memory, parse_memory
from .tasks import check_mqar

CONFIG_DIR = Path(__file__).parent / "configs"
RULES = BUILT_IN_RULES

@dataclass
class TrainConfig:
    """Optimisation of one run. `batch_size` is the global batch, split over the DDP processes."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # torch threads a run trains with, whatever else runs: the thread count changes the order of sums, and a
    # few hundred steps amplify that rounding into different results, so it is part of a run's settings
    threads: int = 1
    device: str = "auto"  # "auto" (cuda if available), "cpu" or "cuda"


@dataclass
class MQARConfig:
    """Multi-query associative recall (`tasks.MQAR`)."""

    vocab_size: int = 256
    seq_len: int = 128
    num_pairs: int = 16
    power_a: float = 0.01
    random_fill: bool = True
    test_examples: int = 1000
    test_seed: int = 1234
    train_num_pairs: Optional[list[int]] = None  # train on a mix of sizes (Zoology); None: num_pairs
    test_num_pairs: Optional[list[int]] = None  # also test at these sizes (accuracy_by_pairs)
    rules: Optional[list[str]] = None  # the rules of the grid this task runs; None: all of them; []: none
    model: dict = field(default_factory=dict)  # overrides of `model` for this task
    train: dict = field(default_factory=dict)  # overrides of `train` for this task

    def check(self, prefix: str) -> None:
        """The task's own fields; errors name them under `prefix` (e.g. tasks.mqar)."""
        check_mqar(self.vocab_size, self.seq_len, self.num_pairs, prefix)
        _positive(self.power_a, f"{prefix}.power_a")
        if self.test_examples < 1:
            raise ValueError(f"{prefix}.test_examples: expected at least 1, got {self.test_examples}")
        for name in ("train_num_pairs", "test_num_pairs"):
            for i, p in enumerate(getattr(self, name) or ()):
                try:
                    check_mqar(self.vocab_size, self.seq_len, p)
                except ValueError as e:
                    raise ValueError(f"{prefix}.{name}[{i}]: {p} pairs do not fit ({e})") from None


@dataclass
class LMConfig:
    """Byte-level language modelling with length extrapolation (`tasks.ByteLM`)."""

    path: Optional[str] = None  # a text file; None: the standard library's .py sources
    seq_len: int = 128
    extrapolate: int = 8
    holdout_every: int = 10
    max_bytes: Optional[int] = None
    eval_windows: int = 64
    rules: Optional[list[str]] = None
    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)

    def check(self, prefix: str) -> None:
        """The task's own fields; errors name them under `prefix` (e.g. tasks.lm)."""
        if self.path not in (None, "stdlib") and not Path(self.path).is_file():
            raise ValueError(f"{prefix}.path: no such file: {self.path!r}")
        _positive(self.extrapolate, f"{prefix}.extrapolate")
        _positive(self.seq_len, f"{prefix}.seq_len")


TASK_CONFIGS = {"mqar": MQARConfig, "lm": LMConfig}


@dataclass
class AblateConfig:
    name: str = "ablation"
    rules: list[str] = field(default_factory=lambda: list(RULES))
    memories: list[str] = field(default_factory=lambda: list(MEMORIES))
    seeds: list[int] = field(default_factory=lambda: [0])
    tasks: dict = field(default_factory=dict)  # task name -> MQARConfig / LMConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    jobs: int = 1  # runs trained at once in separate processes (CPU only); 0: one per core, at most 8
    # Learning rates swept per configuration at the first seed; the one scoring best on the task's
    # validation split is then run at every seed. None: every run at train.lr.
    lrs: Optional[list[float]] = None


def _type_ok(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def _yaml_floats(value, hint):
    """YAML 1.1 reads 3e-3 (no dot) as a string: read it as the float it means where one is expected."""
    def as_float(v):
        try:
            return float(v) if isinstance(v, str) else v
        except ValueError:
            return v

    present = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(present) == 1:
        hint = present[0]  # Optional[X]: X
    if hint is float:
        return as_float(value)
    if hint == list[float] and isinstance(value, list):
        return [as_float(v) for v in value]
    return value


def _describe(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def from_dict(cls, data, where: str):
    """`cls(**data)` for a dataclass, checking every field's name and type; errors name the field
    by its path in the config (e.g. `tasks.mqar.train.steps`)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in known:
            raise ValueError(f"{path}: unknown field; {where or 'the config'} takes {known}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value, path)
        else:
            value = _yaml_floats(value, hint)
            if not _type_ok(value, hint):
                raise ValueError(f"{path}: expected {_describe(hint)}, got {value!r}")
            if hint is float:
                value = float(value)
        kwargs[key] = value
    return cls(**kwargs)


def _positive(value, path, zero_ok=False):
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{path}: expected a finite value {'>= 0' if zero_ok else '> 0'}, got {value!r}")


def int_at_least(minimum: int, note: str = ""):
    """An argparse type for the command lines' counts and sizes: an integer >= `minimum` (argparse names the
    option in its error); `note` says what the bound means."""
    bound = f"an integer >= {minimum}" + (f" ({note})" if note else "")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {bound}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {bound}, got {value}")
        return value
    return parse


positive_int = int_at_least(1)


def _path(task_name, task, section, name):
    """A field's path as the user wrote it: the task's override if it has one, else the shared one."""
    return f"tasks.{task_name}.{section}.{name}" if name in getattr(task, section) else f"{section}.{name}"


def parse_config(data: dict) -> AblateConfig:
    """An `AblateConfig` from the YAML's mapping, checked (see the module docstring)."""
    if not isinstance(data, dict):
        raise ValueError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    tasks = data.get("tasks")
    rest = {k: v for k, v in data.items() if k != "tasks"}
    config = from_dict(AblateConfig, rest, "")
    if not isinstance(tasks, dict) or not tasks:
        raise ValueError(f"tasks: expected a mapping of task name -> settings with at least one of "
                         f"{sorted(TASK_CONFIGS)}, got {tasks!r}")
    for name, settings in tasks.items():
        if name not in TASK_CONFIGS:
            raise ValueError(f"tasks.{name}: unknown task; known: {sorted(TASK_CONFIGS)}")
        config.tasks[name] = from_dict(TASK_CONFIGS[name], settings, f"tasks.{name}")
    check_config(config)
    return config


def check_config(config: AblateConfig):
    import memplug

    for field_name in ("rules", "memories", "seeds"):
        if not getattr(config, field_name):
            raise ValueError(f"{field_name}: expected a non-empty list")
        values = getattr(config, field_name)
        if len(set(values)) != len(values):
            raise ValueError(f"{field_name}: repeated entries in {values}")
    for i, rule in enumerate(config.rules):
        if rule not in memplug.available_rules():
            raise ValueError(f"rules[{i}]: unknown rule {rule!r}; known: {memplug.available_rules()}")
    for i, memory in enumerate(config.memories):
        try:
            parse_memory(memory)
        except ValueError as e:
            raise ValueError(f"memories[{i}]: {e}") from None
    _positive(config.jobs, "jobs", zero_ok=True)
    if config.lrs is not None:
        if not config.lrs or len(set(config.lrs)) != len(config.lrs):
            raise ValueError(f"lrs: expected distinct learning rates, got {config.lrs}")
        for i, lr in enumerate(config.lrs):
            _positive(lr, f"lrs[{i}]")
        for task_name, task in config.tasks.items():
            if "lr" in task.train:
                raise ValueError(f"tasks.{task_name}.train.lr: the grid sweeps lrs {config.lrs}; a task's own lr "
                                 f"would be overridden")
    for task_name, task in config.tasks.items():
        model, train = resolved(config, task_name)
        for i, rule in enumerate(task_rules(config, task)):
            if rule not in config.rules:
                raise ValueError(f"tasks.{task_name}.rules[{i}]: {rule!r} is not one of the grid's rules "
                                 f"{config.rules}")
        for name in ("steps", "batch_size", "lr"):
            _positive(getattr(train, name), _path(task_name, task, "train", name))
        if train.threads < 1:  # configs written before 2026-12-05 hold 0, then "cores / processes"
            raise ValueError(f"{_path(task_name, task, 'train', 'threads')}: expected an integer >= 1, the torch "
                             f"threads of each run (0, once 'cores / processes', is gone: the count changes a run's "
                             f"results; 1 is what every grid of several runs at once used), got {train.threads!r}")
        for name in ("warmup", "min_lr_ratio", "weight_decay", "grad_clip"):
            _positive(getattr(train, name), _path(task_name, task, "train", name), zero_ok=True)
        if train.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"{_path(task_name, task, 'train', 'device')}: expected 'auto', 'cpu' or 'cuda', "
                             f"got {train.device!r}")
        if train.device == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{_path(task_name, task, 'train', 'device')}: 'cuda' asked for, but torch sees no "
                             f"CUDA device here")
        for name in ("d_model", "n_layers", "num_heads", "head_k_dim", "head_v_dim", "num_slots", "topk"):
            _positive(getattr(model, name), _path(task_name, task, "model", name))
        _positive(model.mlp_ratio, _path(task_name, task, "model", "mlp_ratio"), zero_ok=True)
        backend = model.layer.get("backend", "auto")
        if backend != "auto":
            device = torch.device("cuda" if train.device == "cuda" or (
                train.device == "auto" and torch.cuda.is_available()) else "cpu")
            for rule in config.rules:
                try:
                    resolve_backend(backend, device, torch.float32, get_rule(rule))
                except ValueError as e:
                    raise ValueError(f"{_path(task_name, task, 'model', 'layer')}.backend: cannot run rule {rule!r} "
                                     f"on {device.type} here ({e})") from None
        prefix = f"tasks.{task_name}.model" if ("topk" in task.model or "num_slots" in task.model) else "model"
        if model.topk > model.num_slots:
            raise ValueError(f"{prefix}.topk: R = {model.topk} routes per token, more than the "
                             f"num_slots = {model.num_slots} slots (m)")
        if "fm_sparse" in config.memories and model.topk == model.num_slots:
            raise ValueError(f"{prefix}.topk: fm_sparse needs R < m, got R = m = {model.topk} "
                             "(that is fm_dense's routing)")
        for k in task.model:
            if k not in ModelConfig.__dataclass_fields__:
                raise ValueError(f"tasks.{task_name}.model.{k}: unknown field; model takes "
                                 f"{list(ModelConfig.__dataclass_fields__)}")
        task.check(f"tasks.{task_name}")
        if model.router_init not in ("default", "zero"):
            prefix = f"tasks.{task_name}.model" if "router_init" in task.model else "model"
            raise ValueError(f"{prefix}.router_init: expected 'default' or 'zero', got {model.router_init!r}")
        for key in ("rule", "num_slots", "topk"):
            if key in model.layer:
                raise ValueError(f"model.layer.{key}: set by the grid (rules, model.num_slots, model.topk), "
                                 "not by the layer's extra arguments")
        if "router" in model.layer:
            raise ValueError("model.layer.router: would replace each configuration's own router; set router "
                             "options over it in model.router")
        # every memory layer of the grid builds
        for rule in config.rules:
            for memory in config.memories:
                try:
                    build_memory(memory, rule, model)
                except (ValueError, TypeError) as e:
                    where = "model.router" if str(e).startswith("router") and model.router else "model.layer"
                    raise ValueError(f"{where} (task {task_name}, rule {rule}, memory {memory}): {e}") from None
    if not any(task_rules(config, task) for task in config.tasks.values()):
        raise ValueError(f"tasks: every task's rules is empty ({', '.join(f'tasks.{n}.rules' for n in config.tasks)}): "
                         "nothing to train")


def task_rules(config: AblateConfig, task) -> list[str]:
    """The grid's rules a task runs: its `rules` (an empty list: none, the task left out), or every
    rule of the grid where it names none."""
    return config.rules if task.rules is None else task.rules


def resolved(config: AblateConfig, task_name: str):
    """The model and train settings of a task: the config's, with the task's overrides."""
    task = config.tasks[task_name]
    model = from_dict(ModelConfig, {**dataclasses.asdict(config.model), **task.model}, f"tasks.{task_name}.model")
    train = from_dict(TrainConfig, {**dataclasses.asdict(config.train), **task.train}, f"tasks.{task_name}.train")
    return model, train


def load_config(path: Optional[str] = None, preset: Optional[str] = None, overrides=()) -> AblateConfig:
    if (path is None) == (preset is None):
        raise ValueError("config: give exactly one of --config FILE and --preset NAME")
    if preset is not None:
        file = CONFIG_DIR / f"{preset}.yaml"
        if not file.is_file():
            raise ValueError(f"--preset: unknown preset {preset!r}; known: {presets()}")
    else:
        file = Path(path)
        if not file.is_file():
            raise ValueError(f"--config: no such file: {path!r}")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{file}, line {mark.line + 1}" if mark is not None else str(file)
        raise ValueError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set: expected KEY=VALUE (e.g. train.steps=10), got {item!r}")
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {p} is not a mapping")
        node[last] = yaml.safe_load(value)
    return parse_config(data)


def presets():
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
