"""`memplug ablate`: a grid of small language models, rules x memory configurations x tasks x seeds.

    memplug ablate --preset quick --out runs/quick             # the README's main job (CPU, < 10 min)
    memplug ablate --config my.yaml --out runs/mine --set train.steps=100
    torchrun --nproc_per_node 2 -m memplug.cli ablate --preset paper --out runs/paper   # DDP

The YAML config (`config.py`; presets in `configs/`) is checked before anything trains: a bad
field stops the command with a message naming it.

Every finished run appends one JSON line to `OUT/results.jsonl` (written and flushed at once, so a
killed grid loses only the run in flight); a restarted grid skips the runs already there with the
same settings. At the end `OUT/results.md` (printed too) puts the configurations side by side, and
`OUT/accuracy_vs_state.png` / `OUT/lm_loss_by_position.png` plot them (`report.py`).

Under `torchrun` every process trains on its own share of each batch (DDP: gloo on CPU, NCCL on
GPU) and evaluates its share of the test set; rank 0 writes the outputs. The device is CUDA when
there is one, else CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import fcntl
import functools
import importlib
import importlib.metadata
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from memplug.routing import routing_stats, update_balance_biases

from .config import AblateConfig, ModelConfig, TrainConfig, int_at_least, load_config, presets, resolved, task_rules
from .model import LM
from .report import append_result, markdown_table, plot, read_results
from .tasks import IGNORE, TASKS


# ----------------------------------------------------------------------------------------- runs
# Part of every run's settings: a change of what a run measures (2: validation splits, and byte LM
# tests on the second half of its held-out text) retrains the runs of older folders on resume.
PROTOCOL = 2


@dataclass
class Run:
    task: str
    rule: str
    memory: str
    seed: int
    model: ModelConfig
    train: TrainConfig
    task_config: object
    swept: bool = False  # the grid sweeps learning rates: the id names this run's

    @property
    def id(self) -> str:
        lr = f"/lr{self.train.lr:g}" if self.swept else ""
        return f"{self.task}/{self.rule}/{self.memory}{lr}/seed{self.seed}"

    @property
    def configuration(self) -> tuple:
        """What a learning-rate sweep picks a rate for."""
        return self.task, self.rule, self.memory

    def settings(self) -> dict:
        task = {k: v for k, v in dataclasses.asdict(self.task_config).items() if k not in ("model", "train", "rules")}
        train = {k: v for k, v in dataclasses.asdict(self.train).items() if k != "device"}
        return {"task": self.task, "rule": self.rule, "memory": self.memory, "seed": self.seed,
                "task_config": task, "model": dataclasses.asdict(self.model), "train": train, "protocol": PROTOCOL}

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:12]


def grid(config: AblateConfig) -> list[Run]:
    """The runs to train first: every configuration at every seed, or, when the config sweeps
    learning rates (`lrs`), every configuration at every rate with the first seed (`final_runs`
    then adds the other seeds at the rate chosen on the validation split)."""
    runs = []
    for task_name, task in config.tasks.items():
        model, train = resolved(config, task_name)
        for rule in task_rules(config, task):
            for memory in config.memories:
                if config.lrs:
                    runs += [Run(task_name, rule, memory, config.seeds[0], model, dataclasses.replace(train, lr=lr),
                                 task, swept=True) for lr in config.lrs]
                else:
                    runs += [Run(task_name, rule, memory, seed, model, train, task) for seed in config.seeds]
    return runs


def best_rates(config: AblateConfig, sweep: list[Run], records: dict) -> dict:
    """The learning rate of each configuration whose first-seed run scores best on the validation
    split (the task's `selection`); a diverged run never wins, and ties go to the smaller rate.
    Configurations with a sweep run not yet trained are left out."""
    chosen = {}
    by_configuration = {}
    for run in sweep:
        by_configuration.setdefault(run.configuration, []).append(run)
    for configuration, runs in by_configuration.items():
        if any((run.id, run.hash) not in records for run in runs):
            continue
        key, direction = TASKS[configuration[0]].selection
        sign = 1 if direction == "max" else -1

        def score(run):
            value = records[(run.id, run.hash)].get(key)
            return -math.inf if value is None or not math.isfinite(value) else sign * value

        chosen[configuration] = max(sorted(runs, key=lambda run: run.train.lr), key=score).train.lr
    return chosen


def final_runs(config: AblateConfig, sweep: list[Run], records: dict) -> list[Run]:
    """Every seed of each configuration at its chosen rate (the first seed's run is the sweep's)."""
    chosen = best_rates(config, sweep, records)
    runs = []
    for run in sweep:
        if chosen.get(run.configuration) == run.train.lr:
            runs += [dataclasses.replace(run, seed=seed) for seed in config.seeds]
    return runs


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
    """`routing_stats` of every routed layer on one validation batch."""
    routing = model(task.probe_batch().to(device))[2]["routing"]
    out = []
    for r in routing:
        if r is None:
            continue
        s = routing_stats(r)
        out.append({"load": s["load"].tolist(), "entropy": round(s["entropy"], 4),
                    "unused_fraction": s["unused_fraction"]})
    return out


def replica_drift(model) -> float:
    """Largest difference between a parameter or floating-point buffer (a router's balancing bias) on
    any process and on rank 0: 0 when the replicas stay in step, as they must (every rank applies the
    same averaged gradients, and moves its biases by the same global load)."""
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    flat = torch.cat([t.detach().flatten() for t in tensors])
    first = flat.clone()
    dist.broadcast(first, src=0)
    drift = (flat - first).abs().max()
    dist.all_reduce(drift, op=dist.ReduceOp.MAX)
    return drift.item()


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The memplug code a run trained with: `git_version` of its checkout, or the installed version
    where memplug is not a git checkout."""
    import memplug

    described = git_version(Path(memplug.__file__).resolve().parent.parent)
    return described or "memplug " + importlib.metadata.version("memplug")


def git_version(root: Path) -> Optional[str]:
    """The commit checked out at `root`, with "-dirty" if tracked files other than committed results
    (`experiments/results/`, which a grid itself appends to) differ from it; None if not a checkout."""
    git = ["git", "-C", str(root)]
    try:
        commit = subprocess.run(git + ["rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=30)
        changed = subprocess.run(git + ["diff", "--quiet", "HEAD", "--", ":/", ":(exclude,top)experiments/results"],
                                 capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0 or changed.returncode not in (0, 1):
        return None
    return commit.stdout.strip() + ("-dirty" if changed.returncode else "")


def train_run(run: Run, task, env, progress=None) -> dict:
    """Train and evaluate one run; returns its JSON record (on every rank). `progress(loss)` is
    called after every step with the step's loss (a tensor), and with None for each step a diverged
    run did not train. A run whose loss or memory inputs turn non-finite stops there and is recorded
    as diverged, with its step and no metrics."""
    cpu_start = time.process_time()  # the run's whole CPU time: building, training, validating, testing
    device, rank, world = env["device"], env["rank"], env["world_size"]
    train = run.train
    if train.batch_size % world:
        raise ValueError(f"train.batch_size: {train.batch_size} does not split over {world} processes")
    torch.set_num_threads(train.threads)  # its own count, not the machine's: part of what its numbers depend on
    torch.manual_seed(run.seed)
    model = LM(task.vocab_size, run.model, run.memory, run.rule).to(device)
    params = sum(p.numel() for p in model.parameters())
    net = model
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    opt = optimizer(model, train)
    generator = torch.Generator().manual_seed(run.seed * 1_000_003 + rank)
    per_rank = train.batch_size // world
    losses = []
    routing_history = []  # routing health at a quarter, half and three quarters of training
    curve = []  # validation loss and accuracy at those steps and at the end
    checkpoints = {max(1, round(train.steps * f)) for f in (0.25, 0.5, 0.75)}
    refused_at = None  # the step at which the memory's checks refused non-finite values
    start = time.perf_counter()
    model.train()
    for step in range(train.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, train)
        x, y = task.train_batch(per_rank, generator)
        x, y = x.to(device), y.to(device)
        try:
            logits, _, aux = net(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            (loss + aux["aux_loss"]).backward()
            if train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            opt.step()
            update_balance_biases(model)  # routers with an auxiliary-loss-free balancing bias
            losses.append(loss.detach())  # no .item() here: on a GPU that would wait for every step
            if step + 1 in checkpoints:
                model.eval()
                curve.append({"step": step + 1, **task.validate(model, device, rank, world)})
                if rank == 0 and model.blocks[0].memory.router is not None:
                    routing_history.append({"step": step + 1, "layers": routing_summary(model, task, device)})
                model.train()
        except ValueError:  # the memory's input checks refused non-finite values
            if all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                raise  # not a divergence: a bug, which must not pass for a result
            refused_at = step
            break
        if progress is not None:
            progress(losses[-1])
    if progress is not None:  # the bars also count the steps a diverged run did not train
        for _ in range(train.steps - (step + 1 if refused_at is None else step)):
            progress(None)
    losses = torch.stack(losses) if losses else torch.zeros(0)
    seconds = time.perf_counter() - start
    drift = None
    if world > 1:  # the record is rank 0's: give it the global batch's loss, and check the replicas agree
        dist.all_reduce(losses)
        losses /= world
        drift = replica_drift(model)
        if drift != 0:
            print(f"warning: {run.id}: DDP replicas differ by up to {drift:.3g} in a parameter", file=sys.stderr)
    losses = losses.tolist()
    non_finite = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    diverged_step = non_finite if non_finite is not None else refused_at
    accounting = {"params": params, "memory_params": model.memory_params(), "state_numel": model.state_numel(),
                  "active_state_numel": model.active_state_numel(),
                  "state_numel_per_layer": model.blocks[0].memory.state_numel(),
                  "memory_flops_per_token": model.memory_flops_per_token()}
    record = {"run": run.id, "config_hash": run.hash, **run.settings(), **accounting, "steps": train.steps,
              "diverged": diverged_step is not None, "diverged_step": diverged_step,
              "train_seconds": seconds, "code": code_version(), "world_size": world,
              "ddp_param_drift": drift, "device": str(device.type),
              "backend": run.model.layer.get("backend", "auto"), "routing_history": routing_history,
              "curve": curve}
    if diverged_step is not None:  # a result like any other: recorded, shown, never retrained on resume
        print(f"warning: {run.id}: diverged at step {diverged_step} (non-finite loss or memory inputs)",
              file=sys.stderr)
        return {**record, "train_loss": None, "eval_loss": None, "accuracy": None, "tokens_per_s": None,
                "routing": None, "cpu_seconds": time.process_time() - cpu_start}
    model.eval()
    validation = task.validate(model, device, rank, world)
    curve.append({"step": train.steps, **validation})
    metrics = {**validation, **task.evaluate(model, device, rank, world)}
    tail = losses[-max(1, len(losses) // 10):]
    record.update({
        "train_loss": sum(tail) / len(tail),
        "eval_loss": metrics.pop("eval_loss"), "accuracy": metrics.pop("accuracy"),
        "tokens_per_s": train.steps * train.batch_size * task.seq_len / seconds,
        "routing": routing_summary(model, task, device) if rank == 0 else None,
        **metrics,
    })
    record.update(task.provenance())
    record["cpu_seconds"] = time.process_time() - cpu_start
    return record


# ---------------------------------------------------------------------------------------- main
def setup_env(train: TrainConfig) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if train.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: 'cuda' asked for, but torch sees no CUDA device")
    use_cuda = train.device == "cuda" or (train.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
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

    # disable=None: bars on a terminal only; in a log the line `_finished` prints per run is the progress
    return tqdm(total=run.train.steps, desc=f"{label} {run.id}", unit="step", position=position, leave=False,
                dynamic_ncols=True, disable=None if show else True)


def _progress(run_bar, tick):
    """The `progress(loss)` of `train_run`: one step on the run's bar (its loss shown every 10 steps),
    then `tick()` for the grid's count."""
    def progress(loss):
        run_bar.update(1)
        if loss is not None and run_bar.n % 10 == 0:
            run_bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        tick()
    return progress


def _finished(record, out, show):
    append_result(out / "results.jsonl", record)
    if show:
        from tqdm.auto import tqdm
        if record["diverged"]:
            tqdm.write(f"{record['run']}: diverged at step {record['diverged_step']}")
        else:
            tqdm.write(f"{record['run']}: accuracy {record['accuracy']:.3f}, eval loss {record['eval_loss']:.3f}, "
                       f"{record['tokens_per_s']:.0f} tokens/s, {record['train_seconds']:.0f} s")


# Worker processes of a grid run with jobs > 1: each trains whole runs, one thread each.
_WORKER = {}


def _exit_with_parent():
    """End this worker when the grid's main process ends, however it ends (SIGKILL included): a
    thread waits on the parent's sentinel."""
    import multiprocessing as mp
    import threading
    from multiprocessing.connection import wait

    parent = mp.parent_process()

    def watch():
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _init_worker(counter, slots, lock, show):
    from tqdm.auto import tqdm

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _exit_with_parent()
    tqdm.set_lock(lock)
    with slots.get_lock():
        slots.value += 1
        slot = slots.value
    _WORKER.update(counter=counter, slot=slot, show=show, tasks={})


def _worker(run: Run, label: str) -> dict:
    key = (run.task, json.dumps(dataclasses.asdict(run.task_config), sort_keys=True))
    if key not in _WORKER["tasks"]:
        _WORKER["tasks"][key] = TASKS[run.task].from_config(run.task_config)
    bar = _run_bar(run, label, _WORKER["slot"], _WORKER["show"])
    counter = _WORKER["counter"]

    def tick():
        with counter.get_lock():
            counter.value += 1

    env = {"device": torch.device("cpu"), "rank": 0, "world_size": 1}
    record = train_run(run, _WORKER["tasks"][key], env, _progress(bar, tick))
    bar.close()
    return record


def resolve_jobs(jobs: int, env, n_runs: int) -> int:
    """Runs trained at once: 1 under torchrun or on a GPU; `jobs` 0 means one per core (at most 8)."""
    if env["world_size"] > 1 or env["device"].type != "cpu" or n_runs < 2:
        return 1
    if jobs == 0:
        jobs = min(8, os.cpu_count() or 1)
    return max(1, min(jobs, n_runs))


class OutputLocked(RuntimeError):
    """Another grid is writing to the same output folder."""


@contextlib.contextmanager
def _locked(out: Path):
    """Hold OUT/.lock for the whole grid, so that two commands never both append to one results.jsonl
    (the lock ends with the process, however it ends)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise OutputLocked(f"--out {out}: another memplug ablate ({holder}) is writing there; wait for it "
                               f"to end or choose another folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield


def run_grid(config: AblateConfig, out: Path, env=None, quiet=False, jobs=None) -> dict:
    """Run (or resume) the grid; returns {"trained": [run ids], "skipped": [...], "records": [...]}.
    `jobs` (default `config.jobs`) runs trained at once in separate processes on a CPU. Raises
    `OutputLocked` if another grid is writing to `out`."""
    env = env or setup_env(config.train)
    if env["rank"] != 0:
        return _run_grid(config, out, env, quiet, jobs)
    with _locked(out):
        return _run_grid(config, out, env, quiet, jobs)


def _run_grid(config: AblateConfig, out: Path, env, quiet, jobs) -> dict:
    rank = env["rank"]
    results = out / "results.jsonl"
    show = rank == 0 and not quiet
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(_config_dict(config), sort_keys=False))
        if results.is_file() and results.stat().st_size and not results.read_bytes().endswith(b"\n"):
            with open(results, "a") as f:  # a line cut short by a kill: end it, it will be skipped
                f.write("\n")
    first = grid(config)
    trained, skipped = _train_missing(config, first, out, env, show, jobs,
                                      "learning-rate sweep" if config.lrs else config.name)
    runs = first
    if config.lrs:
        done = _broadcast(_done(results) if rank == 0 else None, env)
        swept = {(run.id, run.hash) for run in first}
        runs = final_runs(config, first, done)
        more, found = _train_missing(config, [run for run in runs if (run.id, run.hash) not in swept], out, env,
                                     show, jobs, "seeds at the chosen rates")
        trained, skipped = trained + more, skipped + found
    records = []
    if rank == 0:
        done = _done(results)
        records = [done[(run.id, run.hash)] for run in runs if (run.id, run.hash) in done]
        sweep = [done[(run.id, run.hash)] for run in first if config.lrs and (run.id, run.hash) in done]
        table = markdown_table(config, records, sweep)
        (out / "results.md").write_text(table)
        plots = plot(config, records, out)
        if not quiet:
            print(table)
            print("wrote " + ", ".join(str(p) for p in [results, out / "results.md", *plots]))
    if env["world_size"] > 1:
        dist.barrier()
    return {"trained": trained, "skipped": skipped, "records": records}


def _done(results: Path) -> dict:
    """The finished runs of a results.jsonl: (run id, settings hash) -> its latest record."""
    return {(r.get("run"), r.get("config_hash")): r for r in read_results(results)}


def _train_missing(config, runs, out, env, show, jobs, label) -> tuple[list, list]:
    """Train the runs of `runs` not yet in OUT/results.jsonl; returns (trained ids, skipped ids)."""
    from tqdm.auto import tqdm

    rank = env["rank"]
    results = out / "results.jsonl"
    done = _broadcast(set(_done(results)) if rank == 0 else None, env)
    todo = [r for r in runs if (r.id, r.hash) not in done]
    skipped = [r.id for r in runs if (r.id, r.hash) in done]
    jobs = resolve_jobs(config.jobs if jobs is None else jobs, env, len(todo))
    if show:
        print(f"{label}: {len(runs)} runs, {len(skipped)} already in {results}, {len(todo)} to train"
              + (f", {jobs} at a time" if jobs > 1 else "") + f" on {env['device'].type}"
              + (f" x {env['world_size']} processes" if env["world_size"] > 1 else ""))
    # the tasks' data first: a missing or short text file stops the grid before any training
    tasks = {name: TASKS[name].from_config(config.tasks[name]) for name in dict.fromkeys(r.task for r in todo)}
    grid_bar = tqdm(total=sum(r.train.steps for r in todo), desc="grid", unit="step", position=0,
                    dynamic_ncols=True, disable=None if show and todo else True)
    trained = []
    if jobs == 1:
        for i, run in enumerate(todo):
            run_bar = _run_bar(run, f"[{i + 1}/{len(todo)}]", 1, show)
            progress = _progress(run_bar, lambda: grid_bar.update(1))
            record = train_run(run, tasks[run.task], env, progress if show else None)
            run_bar.close()
            if rank == 0:
                _finished(record, out, show)
            trained.append(run.id)
    else:
        trained = _run_parallel(todo, jobs, out, show, grid_bar)
    grid_bar.close()
    return trained, skipped


def _run_parallel(todo, jobs, out, show, grid_bar):
    import multiprocessing as mp

    from tqdm.auto import tqdm

    ctx = mp.get_context("spawn")
    counter, slots, lock = ctx.Value("q", 0), ctx.Value("i", 0), ctx.RLock()
    tqdm.set_lock(lock)
    trained = []
    pool = None
    try:  # an interrupt can come while the pool starts: it is terminated all the same
        pool = ctx.Pool(jobs, initializer=_init_worker, initargs=(counter, slots, lock, show))
        pending = [pool.apply_async(_worker, (run, f"[{i + 1}/{len(todo)}]")) for i, run in enumerate(todo)]
        while pending:
            pending[0].wait(0.5)
            grid_bar.update(counter.value - grid_bar.n)
            for result in [r for r in pending if r.ready()]:
                pending.remove(result)
                record = result.get()  # a worker's exception is raised here
                _finished(record, out, show)
                trained.append(record["run"])
        pool.close()
    except BaseException:
        if pool is not None:
            pool.terminate()  # no worker outlives an error or an interrupt
        raise
    finally:
        if pool is not None:
            pool.join()
    return trained


def _config_dict(config: AblateConfig) -> dict:
    d = dataclasses.asdict(config)
    d["tasks"] = {name: dataclasses.asdict(t) for name, t in config.tasks.items()}
    return d


def _interrupt(signum, frame):
    """SIGTERM unwinds like Ctrl-C, so that the worker processes end with the grid."""
    raise KeyboardInterrupt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="memplug ablate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="presets: " + ", ".join(presets()))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a YAML config (the presets, experiments/configs/*.yaml, are examples)")
    source.add_argument("--preset", help="a config shipped with memplug: " + ", ".join(presets()))
    parser.add_argument("--out", required=True, help="output folder (results.jsonl, results.md, plots)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.steps=50 --set 'rules=[fm]'")
    parser.add_argument("--jobs", type=int_at_least(0, "0: one per core"),
                        help="runs trained at once on a CPU, each in its own process (default: the config's jobs; "
                             "0: one per core)")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first, e.g. one that registers a rule (memplug.register_rule) the "
                             "grid uses")
    parser.add_argument("--dry-run", action="store_true", help="check the config and list the runs")
    args = parser.parse_args(argv)
    for module in args.imports:
        try:
            importlib.import_module(module)
        except ImportError as e:
            print(f"memplug ablate: --import {module}: {e}", file=sys.stderr)
            return 2
    try:
        config = load_config(args.config, args.preset, args.set)
    except ValueError as e:
        print(f"memplug ablate: bad config: {e}", file=sys.stderr)
        return 2
    blocked = next((p for p in (Path(args.out), *Path(args.out).parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        print(f"memplug ablate: --out: {blocked} exists and is not a folder", file=sys.stderr)
        return 2
    if args.dry_run:
        runs = grid(config)
        for run in runs:
            print(run.id, run.hash)
        if config.lrs and len(config.seeds) > 1:
            configurations = len({run.configuration for run in runs})
            print(f"then seeds {config.seeds[1:]} of each of the {configurations} configurations at the rate "
                  f"chosen on the validation split: {configurations * (len(config.seeds) - 1)} more runs")
        return 0
    previous = signal.signal(signal.SIGTERM, _interrupt)
    env = setup_env(config.train)
    try:
        run_grid(config, Path(args.out), env, jobs=args.jobs)
    except OutputLocked as e:
        print(f"memplug ablate: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nmemplug ablate: interrupted; the finished runs are in {Path(args.out) / 'results.jsonl'}; the "
              f"same command resumes from there", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if env["world_size"] > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
