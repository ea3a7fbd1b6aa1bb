"""`memplug ablate`: a grid of small language models, rules x memory configurations x tasks x seeds.

    memplug ablate --preset quick --out runs/quick             # the README's main job (CPU, < 10 min)
    memplug ablate --config my.yaml --out runs/mine --set train.steps=100
    torchrun --nproc_per_node 2 -m memplug.cli ablate --preset paper --out runs/paper   # DDP

The YAML config (see `configs/quick.yaml`) is parsed into the dataclasses below and checked
before anything trains: an unknown field, rule, memory configuration or task, `topk > num_slots`
or a missing text file stops the command with a message naming the field.

Every finished run appends one JSON line to `OUT/results.jsonl` (written and flushed at once, so a
killed grid loses only the run in flight); a restarted grid skips the runs already there with the
same settings. At the end `OUT/results.md` (printed too) puts the configurations side by side, and
`OUT/accuracy_vs_state.png` / `OUT/lm_loss_by_position.png` plot them.

Under `torchrun` every process trains on its own share of each batch (DDP: gloo on CPU, NCCL on
GPU) and evaluates its share of the test set; rank 0 writes the outputs. The device is CUDA when
there is one, else CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from .model import LM, MEMORIES, ModelConfig, memory_kwargs
from .tasks import IGNORE, MQAR, TASKS, ByteLM

CONFIG_DIR = Path(__file__).parent / "configs"
RULES = ("mamba2", "gla", "deltanet", "gated_deltanet", "fm")


# -------------------------------------------------------------------------------------- config
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
    threads: int = 0  # torch threads per process; 0: OMP_NUM_THREADS if set, else cores / processes
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
    model: dict = field(default_factory=dict)  # overrides of `model` for this task
    train: dict = field(default_factory=dict)  # overrides of `train` for this task


@dataclass
class LMConfig:
    """Byte-level language modelling with length extrapolation (`tasks.ByteLM`)."""

    path: Optional[str] = None  # a text file; None: the standard library's .py sources
    seq_len: int = 128
    extrapolate: int = 8
    holdout_every: int = 10
    max_bytes: Optional[int] = None
    eval_windows: int = 64
    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)


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
            if hint is float and isinstance(value, str):  # YAML 1.1 reads 3e-3 as a string
                try:
                    value = float(value)
                except ValueError:
                    pass
            if not _type_ok(value, hint):
                raise ValueError(f"{path}: expected {_describe(hint)}, got {value!r}")
            if hint is float:
                value = float(value)
        kwargs[key] = value
    return cls(**kwargs)


def _positive(value, path, zero_ok=False):
    if value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{path}: expected a value {'>= 0' if zero_ok else '> 0'}, got {value!r}")


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
        if memory not in MEMORIES:
            raise ValueError(f"memories[{i}]: unknown memory configuration {memory!r}; known: {sorted(MEMORIES)}")
    t = config.train
    for name in ("steps", "batch_size", "lr"):
        _positive(getattr(t, name), f"train.{name}")
    _positive(config.jobs, "jobs", zero_ok=True)
    if t.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device: expected 'auto', 'cpu' or 'cuda', got {t.device!r}")
    for task_name, task in config.tasks.items():
        model, train = resolved(config, task_name)
        for name in ("steps", "batch_size", "lr"):
            _positive(getattr(train, name), f"tasks.{task_name}.train.{name}" if name in task.train else f"train.{name}")
        _positive(train.warmup, f"tasks.{task_name}.train.warmup" if "warmup" in task.train else "train.warmup", True)
        for name in ("d_model", "n_layers", "num_heads", "head_k_dim", "head_v_dim", "num_slots", "topk"):
            prefix = f"tasks.{task_name}.model" if name in task.model else "model"
            _positive(getattr(model, name), f"{prefix}.{name}")
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
        if isinstance(task, LMConfig):
            if task.path not in (None, "stdlib") and not Path(task.path).is_file():
                raise ValueError(f"tasks.{task_name}.path: no such file: {task.path!r}")
            _positive(task.extrapolate, f"tasks.{task_name}.extrapolate")
            _positive(task.seq_len, f"tasks.{task_name}.seq_len")
        if isinstance(task, MQARConfig):
            from .tasks import check_mqar
            check_mqar(task.vocab_size, task.seq_len, task.num_pairs, f"tasks.{task_name}")
            for name in ("train_num_pairs", "test_num_pairs"):
                for i, p in enumerate(getattr(task, name) or ()):
                    try:
                        check_mqar(task.vocab_size, task.seq_len, p)
                    except ValueError as e:
                        raise ValueError(f"tasks.{task_name}.{name}[{i}]: {p} pairs do not fit ({e})") from None
        if model.router_init not in ("default", "zero"):
            prefix = f"tasks.{task_name}.model" if "router_init" in task.model else "model"
            raise ValueError(f"{prefix}.router_init: expected 'default' or 'zero', got {model.router_init!r}")
        for key in ("rule", "num_slots", "topk"):
            if key in model.layer:
                raise ValueError(f"model.layer.{key}: set by the grid (rules, model.num_slots, model.topk), "
                                 "not by the layer's extra arguments")
        # every memory layer of the grid builds
        for rule in config.rules:
            for memory in config.memories:
                try:
                    cls, kwargs = memory_kwargs(memory, rule, model.num_slots, model.topk, **model.layer)
                    cls(model.d_model, model.num_heads, model.head_k_dim, model.head_v_dim, **kwargs)
                except (ValueError, TypeError) as e:
                    raise ValueError(f"model.layer (task {task_name}, rule {rule}, memory {memory}): {e}") from None


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
    data = yaml.safe_load(file.read_text()) or {}
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


# ----------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    task: str
    rule: str
    memory: str
    seed: int
    model: ModelConfig
    train: TrainConfig
    task_config: object

    @property
    def id(self) -> str:
        return f"{self.task}/{self.rule}/{self.memory}/seed{self.seed}"

    def settings(self) -> dict:
        task = {k: v for k, v in dataclasses.asdict(self.task_config).items() if k not in ("model", "train")}
        train = {k: v for k, v in dataclasses.asdict(self.train).items() if k not in ("threads", "device")}
        return {"task": self.task, "rule": self.rule, "memory": self.memory, "seed": self.seed,
                "task_config": task, "model": dataclasses.asdict(self.model), "train": train}

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:12]


def grid(config: AblateConfig) -> list[Run]:
    runs = []
    for task_name, task in config.tasks.items():
        model, train = resolved(config, task_name)
        for rule in config.rules:
            for memory in config.memories:
                for seed in config.seeds:
                    runs.append(Run(task_name, rule, memory, seed, model, train, task))
    return runs


def make_task(name, cfg):
    if name == "mqar":
        return MQAR(cfg.vocab_size, cfg.seq_len, cfg.num_pairs, cfg.power_a, cfg.test_examples, cfg.test_seed,
                    cfg.random_fill, train_num_pairs=cfg.train_num_pairs, test_num_pairs=cfg.test_num_pairs)
    return ByteLM(cfg.path, cfg.seq_len, cfg.extrapolate, cfg.holdout_every, cfg.max_bytes, cfg.eval_windows)


def lr_at(step, train: TrainConfig):
    if step < train.warmup:
        return train.lr * (step + 1) / train.warmup
    progress = (step - train.warmup) / max(1, train.steps - train.warmup)
    floor = train.lr * train.min_lr_ratio
    return floor + (train.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer(model, train: TrainConfig):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=train.lr, betas=(0.9, 0.95))


@torch.no_grad()
def routing_summary(model, task, device):
    """`routing_stats` of every routed layer on one evaluation batch."""
    if isinstance(task, MQAR):
        x = task.test[0][:64]
    else:
        x = task._windows(task.heldout, task.eval_starts[:16], task.seq_len)[0]
    routing = model(x.to(device))[2]["routing"]
    out = []
    for r in routing:
        if r is None:
            continue
        from memplug.routing import routing_stats
        s = routing_stats(r)
        out.append({"load": s["load"].tolist(), "entropy": round(s["entropy"], 4),
                    "unused_fraction": s["unused_fraction"]})
    return out


def train_run(run: Run, task, env, progress=None) -> dict:
    """Train and evaluate one run; returns its JSON record (on every rank). `progress(loss)` is
    called after every step with the step's loss (a tensor)."""
    device, rank, world = env["device"], env["rank"], env["world_size"]
    train = run.train
    if train.batch_size % world:
        raise ValueError(f"train.batch_size: {train.batch_size} does not split over {world} processes")
    torch.manual_seed(run.seed)
    model = LM(task.vocab_size, run.model, run.memory, run.rule).to(device)
    params = sum(p.numel() for p in model.parameters())
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = optimizer(model, train)
    generator = torch.Generator().manual_seed(run.seed * 1_000_003 + rank)
    per_rank = train.batch_size // world
    losses = []
    start = time.perf_counter()
    model.train()
    for step in range(train.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, train)
        x, y = task.train_batch(per_rank, generator)
        x, y = x.to(device), y.to(device)
        logits, _, aux = net(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        (loss + aux["aux_loss"]).backward()
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        opt.step()
        losses.append(loss.detach())  # no .item() here: on a GPU that would wait for every step
        if progress is not None:
            progress(losses[-1])
    losses = torch.stack(losses).tolist()
    seconds = time.perf_counter() - start
    if not all(math.isfinite(v) for v in losses):
        print(f"warning: {run.id}: non-finite training loss", file=sys.stderr)
    model.eval()
    metrics = task.evaluate(model, device, rank, world)
    tail = losses[-max(1, len(losses) // 10):]
    record = {
        "run": run.id, "config_hash": run.hash, **run.settings(),
        "params": params, "state_numel": model.state_numel(),
        "state_numel_per_layer": model.blocks[0].memory.state_numel(),
        "steps": train.steps, "train_loss": sum(tail) / len(tail),
        "eval_loss": metrics.pop("eval_loss"), "accuracy": metrics.pop("accuracy"),
        "tokens_per_s": train.steps * train.batch_size * task.seq_len / seconds,
        "train_seconds": seconds, "world_size": world, "device": str(device.type),
        "backend": run.model.layer.get("backend", "auto"),
        "routing": routing_summary(model, task, device) if rank == 0 else None,
        **metrics,
    }
    if isinstance(task, ByteLM):
        record["corpus"] = task.info
    return record


# ------------------------------------------------------------------------------------ results
def read_results(path: Path) -> list[dict]:
    """The records of a results.jsonl; a line cut short by a killed run is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def append_result(path: Path, record: dict):
    line = json.dumps(record) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
    return mean, std


def _cell(values, digits=3):
    mean, std = _mean_std(values)
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _fmt_int(n):
    return f"{n / 1e6:.2f}M" if n >= 1e6 else (f"{n / 1e3:.1f}k" if n >= 1e4 else str(n))


def _blocks(model: ModelConfig) -> str:
    return f"{model.n_layers} blocks of memory" + (" + MLP" if model.mlp_ratio > 0 else " only")


def markdown_table(config: AblateConfig, records: list[dict]) -> str:
    by = {}
    for r in records:
        by.setdefault((r["task"], r["rule"], r["memory"]), []).append(r)
    lines = [f"# memplug ablation: {config.name}", ""]
    for task_name, task in config.tasks.items():
        model, train = resolved(config, task_name)
        found = [r for r in records if r["task"] == task_name]
        if not found:
            continue
        seeds = len(config.seeds)
        state = {m: next((r["state_numel"] for r in found if r["memory"] == m), None) for m in config.memories}
        head = [f"{m} ({_fmt_int(state[m])} state)" if state[m] else m for m in config.memories]
        if task_name == "mqar":
            lines += [f"## MQAR: accuracy on the queried values (higher is better)", "",
                      f"{task.num_pairs} key-value pairs in {task.seq_len} tokens, vocabulary {task.vocab_size}; "
                      f"{train.steps} steps of {train.batch_size} sequences; {_blocks(model)}, d_model "
                      f"{model.d_model}, {model.num_heads} heads of {model.head_k_dim}x{model.head_v_dim}; "
                      f"m = {model.num_slots}, R = {model.topk}; mean over {seeds} seed(s). State: numbers per "
                      "sequence, all layers.", ""]
            metric = lambda rs: _cell([r["accuracy"] for r in rs])
        else:
            L, E = task.seq_len, task.extrapolate
            lines += [f"## Byte LM: held-out loss so far (nats/byte) at the training length L = {L} / at {E}L "
                      "(lower is better)", "",
                      f"Corpus: {found[0].get('corpus', {}).get('source', task.path)}; {train.steps} steps of "
                      f"{train.batch_size} x {L} bytes; {_blocks(model)}, d_model {model.d_model}; "
                      f"m = {model.num_slots}, R = {model.topk}; mean over {seeds} seed(s).", ""]
            metric = lambda rs: (_cell([r["eval_loss"] for r in rs]) + " / "
                                 + _cell([r.get(f"loss@{E}L") for r in rs]))
        lines.append("| rule | " + " | ".join(head) + " |")
        lines.append("|---|" + "---|" * len(head))
        for rule in config.rules:
            cells = [metric(by[(task_name, rule, m)]) if (task_name, rule, m) in by else "—" for m in config.memories]
            lines.append(f"| {rule} | " + " | ".join(cells) + " |")
        lines.append("")
        sizes = sorted({int(p) for r in found for p in r.get("accuracy_by_pairs", {})})
        if len(sizes) > 1:
            lines += ["Accuracy by number of key-value pairs in the test sequences (trained on "
                      f"{task.train_num_pairs or [task.num_pairs]}):", "",
                      "| rule | pairs | " + " | ".join(config.memories) + " |",
                      "|---|---|" + "---|" * len(config.memories)]
            for rule in config.rules:
                for p in sizes:
                    cells = [_cell([r.get("accuracy_by_pairs", {}).get(str(p)) for r in by.get((task_name, rule, m), [])])
                             for m in config.memories]
                    lines.append(f"| {rule} | {p} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Runs", "",
              "| run | params | state | train loss | eval loss | accuracy | tokens/s | unused slots | routing entropy | seconds |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: r["run"]):
        routing = r.get("routing") or []
        unused = _cell([x["unused_fraction"] for x in routing], 2) if routing else "—"
        entropy = _cell([x["entropy"] for x in routing], 2) if routing else "—"
        lines.append(f"| {r['run']} | {_fmt_int(r['params'])} | {_fmt_int(r['state_numel'])} | {r['train_loss']:.3f} | "
                     f"{r['eval_loss']:.3f} | {r['accuracy']:.3f} | {r['tokens_per_s']:.0f} | {unused} | {entropy} | "
                     f"{r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


MARKERS = {"backbone": "o", "fm_dense": "s", "fm_sparse": "^", "mom": "D"}


def plot(config: AblateConfig, records: list[dict], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = {m: f"C{i}" for i, m in enumerate(config.memories)}
    for task_name in config.tasks:
        found = [r for r in records if r["task"] == task_name]
        if not found:
            continue
        rules = [rule for rule in config.rules if any(r["rule"] == rule for r in found)]
        fig, axes = plt.subplots(1, len(rules), figsize=(3.6 * len(rules) + 1.6, 3.6), squeeze=False,
                                 sharey=True, constrained_layout=True)
        for ax, rule in zip(axes[0], rules):
            for memory in config.memories:
                rs = [r for r in found if r["rule"] == rule and r["memory"] == memory]
                if not rs:
                    continue
                if task_name == "mqar":
                    mean, std = _mean_std([r["accuracy"] for r in rs])
                    # configurations of equal state (fm_dense, fm_sparse) side by side, not on top
                    state = rs[0]["state_numel"]
                    same = [m for m in config.memories
                            if any(r["memory"] == m and r["rule"] == rule and r["state_numel"] == state for r in found)]
                    x = state * 2 ** (0.15 * (same.index(memory) - (len(same) - 1) / 2))
                    ax.errorbar([x], [mean], yerr=[std or 0], fmt=MARKERS.get(memory, "o"),
                                color=colors[memory], markersize=8, capsize=3, label=memory)
                    ax.annotate(f"{mean:.2f}", (x, mean), textcoords="offset points", xytext=(0, 8),
                                ha="center", fontsize=7, color=colors[memory])
                else:
                    curves = torch.tensor([r["loss_by_position"] for r in rs]).mean(0)
                    ax.plot(torch.arange(1, len(curves) + 1), curves, color=colors[memory], label=memory)
            ax.set_title(rule)
            ax.grid(alpha=0.3)
            if task_name == "mqar":
                ax.set_xscale("log", base=2)
                ax.set_xlabel("recurrent state (numbers per sequence)")
                ax.set_ylim(-0.02, 1.02)
            else:
                L = config.tasks[task_name].seq_len
                ax.axvline(L, color="gray", ls="--", lw=1)
                ax.text(L, 0.98, " train length", transform=ax.get_xaxis_transform(), va="top", fontsize=8,
                        color="gray")
                ax.set_xscale("log", base=2)
                ax.set_xlabel("position (bytes)")
        if task_name == "mqar":
            axes[0][0].set_ylabel("MQAR accuracy")
            name = "accuracy_vs_state.png"
        else:
            axes[0][0].set_ylabel("held-out loss so far (nats/byte)")
            name = "lm_loss_by_position.png"
        axes[0][-1].legend(fontsize=8, loc="best")
        fig.suptitle(f"{config.name}: {'MQAR accuracy vs state size' if task_name == 'mqar' else 'byte LM loss by position'}")
        path = out / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
        if task_name == "mqar":
            path = _plot_by_pairs(plt, config, found, rules, colors, out)
            if path is not None:
                written.append(path)
    return written


def _plot_by_pairs(plt, config, found, rules, colors, out):
    """MQAR accuracy against the number of key-value pairs (Zoology's view), one panel per rule."""
    sizes = sorted({int(p) for r in found for p in r.get("accuracy_by_pairs", {})})
    if len(sizes) < 2:
        return None
    fig, axes = plt.subplots(1, len(rules), figsize=(3.6 * len(rules) + 1.6, 3.6), squeeze=False, sharey=True,
                             constrained_layout=True)
    for ax, rule in zip(axes[0], rules):
        for memory in config.memories:
            rs = [r for r in found if r["rule"] == rule and r["memory"] == memory]
            if not rs:
                continue
            means = [_mean_std([r.get("accuracy_by_pairs", {}).get(str(p)) for r in rs])[0] for p in sizes]
            means = [float("nan") if m is None else m for m in means]
            ax.plot(sizes, means, marker=MARKERS.get(memory, "o"), color=colors[memory], label=memory)
        ax.set_title(rule)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(p) for p in sizes])
        ax.set_xlabel("key-value pairs in the sequence")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy")
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle(f"{config.name}: MQAR accuracy by number of pairs")
    path = out / "mqar_accuracy_by_pairs.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------- main
def setup_env(train: TrainConfig) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if train.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: 'cuda' asked for, but torch sees no CUDA device")
    use_cuda = train.device == "cuda" or (train.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if train.threads > 0:
        torch.set_num_threads(train.threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return {"device": device, "rank": rank, "world_size": world}


def _broadcast(obj, env):
    if env["world_size"] > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _run_bar(run, label, position, show):
    from tqdm.auto import tqdm

    return tqdm(total=run.train.steps, desc=f"{label} {run.id}", unit="step", position=position, leave=False,
                dynamic_ncols=True, disable=not show)


def _finished(record, out, show):
    append_result(out / "results.jsonl", record)
    if show:
        from tqdm.auto import tqdm
        tqdm.write(f"{record['run']}: accuracy {record['accuracy']:.3f}, eval loss {record['eval_loss']:.3f}, "
                   f"{record['tokens_per_s']:.0f} tokens/s, {record['train_seconds']:.0f} s")


# Worker processes of a grid run with jobs > 1: each trains whole runs, one thread each.
_WORKER = {}


def _init_worker(counter, slots, lock, threads, show):
    from tqdm.auto import tqdm

    tqdm.set_lock(lock)
    torch.set_num_threads(threads)
    with slots.get_lock():
        slots.value += 1
        slot = slots.value
    _WORKER.update(counter=counter, slot=slot, show=show, tasks={})


def _worker(run: Run, label: str) -> dict:
    key = (run.task, json.dumps(dataclasses.asdict(run.task_config), sort_keys=True))
    if key not in _WORKER["tasks"]:
        _WORKER["tasks"][key] = make_task(run.task, run.task_config)
    bar = _run_bar(run, label, _WORKER["slot"], _WORKER["show"])
    counter = _WORKER["counter"]

    def progress(loss):
        bar.update(1)
        if bar.n % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        with counter.get_lock():
            counter.value += 1

    env = {"device": torch.device("cpu"), "rank": 0, "world_size": 1}
    record = train_run(run, _WORKER["tasks"][key], env, progress)
    bar.close()
    return record


def resolve_jobs(jobs: int, env, n_runs: int) -> int:
    """Runs trained at once: 1 under torchrun or on a GPU; `jobs` 0 means one per core (at most 8)."""
    if env["world_size"] > 1 or env["device"].type != "cpu" or n_runs < 2:
        return 1
    if jobs == 0:
        jobs = min(8, os.cpu_count() or 1)
    return max(1, min(jobs, n_runs))


def run_grid(config: AblateConfig, out: Path, env=None, quiet=False, jobs=None) -> dict:
    """Run (or resume) the grid; returns {"trained": [run ids], "skipped": [...], "records": [...]}.
    `jobs` (default `config.jobs`) runs trained at once in separate processes on a CPU."""
    from tqdm.auto import tqdm

    env = env or setup_env(config.train)
    rank = env["rank"]
    results = out / "results.jsonl"
    runs = grid(config)
    done = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(_config_dict(config), sort_keys=False))
        if results.is_file() and results.stat().st_size and not results.read_bytes().endswith(b"\n"):
            with open(results, "a") as f:  # a line cut short by a kill: end it, it will be skipped
                f.write("\n")
        done = {(r.get("run"), r.get("config_hash")) for r in read_results(results)}
    done = _broadcast(done, env)
    todo = [r for r in runs if (r.id, r.hash) not in done]
    skipped = [r.id for r in runs if (r.id, r.hash) in done]
    show = rank == 0 and not quiet
    jobs = resolve_jobs(config.jobs if jobs is None else jobs, env, len(todo))
    if show:
        print(f"{config.name}: {len(runs)} runs, {len(skipped)} already in {results}, {len(todo)} to train"
              + (f", {jobs} at a time" if jobs > 1 else "") + f" on {env['device'].type}"
              + (f" x {env['world_size']} processes" if env["world_size"] > 1 else ""))
    # the tasks' data first: a missing or short text file stops the grid before any training
    tasks = {name: make_task(name, config.tasks[name]) for name in dict.fromkeys(r.task for r in todo)}
    grid_bar = tqdm(total=sum(r.train.steps for r in todo), desc="grid", unit="step", position=0,
                    dynamic_ncols=True, disable=not show or not todo)
    trained = []
    if jobs == 1:
        for i, run in enumerate(todo):
            run_bar = _run_bar(run, f"[{i + 1}/{len(todo)}]", 1, show)

            def progress(loss):
                run_bar.update(1)
                if run_bar.n % 10 == 0:
                    run_bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                grid_bar.update(1)

            record = train_run(run, tasks[run.task], env, progress if show else None)
            run_bar.close()
            if rank == 0:
                _finished(record, out, show)
            trained.append(run.id)
    else:
        trained = _run_parallel(todo, jobs, config.train.threads, out, show, grid_bar)
    grid_bar.close()
    records = []
    if rank == 0:
        wanted = {(r.id, r.hash) for r in runs}
        latest = {}
        for r in read_results(results):
            if (r.get("run"), r.get("config_hash")) in wanted:
                latest[r["run"]] = r
        records = list(latest.values())
        table = markdown_table(config, records)
        (out / "results.md").write_text(table)
        plots = plot(config, records, out)
        if not quiet:
            print(table)
            print("wrote " + ", ".join(str(p) for p in [results, out / "results.md", *plots]))
    if env["world_size"] > 1:
        dist.barrier()
    return {"trained": trained, "skipped": skipped, "records": records}


def _run_parallel(todo, jobs, threads, out, show, grid_bar):
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from tqdm.auto import tqdm

    ctx = mp.get_context("spawn")
    counter, slots, lock = ctx.Value("q", 0), ctx.Value("i", 0), ctx.RLock()
    tqdm.set_lock(lock)
    threads = threads if threads > 0 else max(1, (os.cpu_count() or 1) // jobs)
    trained = []
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(counter, slots, lock, threads, show)) as pool:
        pending = {pool.submit(_worker, run, f"[{i + 1}/{len(todo)}]") for i, run in enumerate(todo)}
        try:
            while pending:
                finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                grid_bar.update(counter.value - grid_bar.n)
                for future in finished:
                    record = future.result()
                    _finished(record, out, show)
                    trained.append(record["run"])
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return trained


def _config_dict(config: AblateConfig) -> dict:
    d = dataclasses.asdict(config)
    d["tasks"] = {name: dataclasses.asdict(t) for name, t in config.tasks.items()}
    return d


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="memplug ablate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="presets: " + ", ".join(presets()))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a YAML config (see memplug/experiments/configs/*.yaml)")
    source.add_argument("--preset", help="a config shipped with memplug: " + ", ".join(presets()))
    parser.add_argument("--out", required=True, help="output folder (results.jsonl, results.md, plots)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.steps=50 --set 'rules=[fm]'")
    parser.add_argument("--jobs", type=int, help="runs trained at once on a CPU, each in its own process "
                        "(default: the config's jobs; 0: one per core)")
    parser.add_argument("--dry-run", action="store_true", help="check the config and list the runs")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.preset, args.set)
    except ValueError as e:
        print(f"memplug ablate: bad config: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for run in grid(config):
            print(run.id, run.hash)
        return 0
    env = setup_env(config.train)
    try:
        run_grid(config, Path(args.out), env, jobs=args.jobs)
    finally:
        if env["world_size"] > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
