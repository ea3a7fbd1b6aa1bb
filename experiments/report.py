"""The outputs of a grid: `results.jsonl` (one JSON line per finished run, written as it ends),
the markdown table that puts the configurations side by side, and the plots."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import AblateConfig, resolved
from .model import ModelConfig, parse_memory
from .tasks import TASKS

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


def _result(rs, metric, digits=3) -> str:
    """mean ± std over the finished runs, their number n, and the diverged runs (never dropped)."""
    diverged = sum(1 for r in rs if r.get("diverged"))
    finished = [metric(r) for r in rs if not r.get("diverged")]
    if not finished:
        return f"diverged (n = {diverged})" if diverged else "—"
    return _cell(finished, digits) + f" (n = {len(finished)}" + (f", {diverged} diverged)" if diverged else ")")


def _fmt_int(n):
    return f"{n / 1e6:.2f}M" if n >= 1e6 else (f"{n / 1e3:.1f}k" if n >= 1e4 else str(n))


def _rate(config: AblateConfig, train) -> str:
    if config.lrs:
        return (f"the learning rate of {config.lrs} that scores best on the validation split at seed "
                f"{config.seeds[0]} (per configuration, below)")
    return f"learning rate {train.lr:g}"


def _blocks(model: ModelConfig) -> str:
    return f"{model.n_layers} blocks of memory" + (" + MLP" if model.mlp_ratio > 0 else " only")


def is_backbone(memory: str) -> bool:
    return parse_memory(memory)[0] == "backbone"


def _matched(found, rule, budget_key, budget, metric_of):
    """The backbone frontier point of `rule` with the smallest `budget_key` >= `budget` (a baseline
    never gets less than the method it is compared with): `(memory, its cell)`, or None."""
    frontier = {}
    for r in found:
        if r["rule"] == rule and is_backbone(r["memory"]) and r.get(budget_key, 0) >= budget:
            frontier.setdefault((r[budget_key], r["memory"]), []).append(r)
    if not frontier:
        return None
    (_, memory), rs = min(frontier.items())
    return memory, _result(rs, metric_of)


def sweep_table(config: AblateConfig, task_name: str, sweep: list[dict]) -> list[str]:
    """The validation metric of each configuration at each swept learning rate (first seed), the
    chosen rate in bold."""
    key, direction = TASKS[task_name].selection
    found = [r for r in sweep if r["task"] == task_name]
    if not found:
        return []
    lines = [f"Learning-rate sweep: validation {key.removeprefix('val_')} at seed {config.seeds[0]} (the "
             f"{'highest' if direction == 'max' else 'lowest'} is chosen, in bold; every configuration gets the "
             f"same rates).", "", "| rule | memory | " + " | ".join(f"lr {lr:g}" for lr in config.lrs) + " |",
             "|---|---|" + "---|" * len(config.lrs)]
    for rule in config.rules:
        for memory in config.memories:
            rs = {r["train"]["lr"]: r for r in found if r["rule"] == rule and r["memory"] == memory}
            if not rs:
                continue
            scores = {lr: (None if r.get("diverged") else r.get(key)) for lr, r in rs.items()}
            finite = {lr: v for lr, v in scores.items() if v is not None}
            best = None
            if finite and len(rs) == len(config.lrs):
                best = (max if direction == "max" else min)(sorted(finite), key=lambda lr: finite[lr])
            cells = []
            for lr in config.lrs:
                if lr not in rs:
                    cells.append("—")
                elif scores[lr] is None:
                    cells.append("diverged")
                else:
                    cells.append(f"**{scores[lr]:.3f}**" if lr == best else f"{scores[lr]:.3f}")
            lines.append(f"| {rule} | {memory} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown_table(config: AblateConfig, records: list[dict], sweep: list[dict] = ()) -> str:
    by = {}
    for r in records:
        by.setdefault((r["task"], r["rule"], r["memory"]), []).append(r)
    lines = [f"# memplug ablation: {config.name}", ""]
    for task_name, task in config.tasks.items():
        model, train = resolved(config, task_name)
        found = [r for r in records if r["task"] == task_name]
        if not found:
            continue
        kind = TASKS[task_name]
        lines += [f"## {kind.title}: {kind.heading}", "",
                  f"{kind.describe(task, found)}; {train.steps} steps of {train.batch_size} {kind.batch_unit(task)} "
                  f"at {_rate(config, train)}; {_blocks(model)}, d_model {model.d_model}, {model.num_heads} heads of "
                  f"{model.head_k_dim}x{model.head_v_dim} (backbone_xN: N times the value width); "
                  f"m = {model.num_slots}, R = {model.topk}; seeds {config.seeds}.", ""]
        metric_key, metric_name = kind.headline
        metric_of = lambda r, key=metric_key: r[key]  # noqa: E731 (bound per task)
        lines += ["State: numbers per sequence, all layers (total: every slot; active: the slots one token "
                  "writes). Memory parameters and forward FLOPs per token of the memory layers. "
                  "Results: mean ± std over seeds, n finished runs; diverged runs are counted, never dropped.",
                  "", f"| rule | memory | total state | active state | memory params | FLOPs/token | {metric_name} |",
                  "|---|---|---|---|---|---|---|"]
        for rule in config.rules:
            for memory in config.memories:
                rs = by.get((task_name, rule, memory))
                if not rs:
                    continue
                r0 = rs[0]
                lines.append(f"| {rule} | {memory}" + (f" (lr {r0['train']['lr']:g})" if config.lrs else "") +
                             f" | {_fmt_int(r0['state_numel'])} | "
                             f"{_fmt_int(r0.get('active_state_numel', r0['state_numel']))} | "
                             f"{_fmt_int(r0.get('memory_params', 0))} | "
                             f"{_fmt_int(r0.get('memory_flops_per_token', 0))} | "
                             f"{_result(rs, metric_of)} |")
        lines.append("")
        lines += sweep_table(config, task_name, list(sweep))
        routed = [m for m in config.memories if not is_backbone(m)]
        if routed and any(is_backbone(m) for m in config.memories):
            lines += ["Each routed memory against the plain backbone at equal budget: the smallest backbone of the "
                      "grid with at least its total state, and with at least its active state.", "",
                      f"| rule | memory | {metric_name} | backbone, >= total state | backbone, >= active state |",
                      "|---|---|---|---|---|"]
            for rule in config.rules:
                for memory in routed:
                    rs = by.get((task_name, rule, memory))
                    if not rs:
                        continue
                    cells = []
                    for key in ("state_numel", "active_state_numel"):
                        match = _matched(found, rule, key, rs[0].get(key, rs[0]["state_numel"]), metric_of)
                        cells.append("none in the grid" if match is None else f"{match[0]}: {match[1]}")
                    lines.append(f"| {rule} | {memory} | {_result(rs, metric_of)} | " + " | ".join(cells) + " |")
            lines.append("")
        extra = kind.extra_metric(task)
        if extra is not None:
            key, name = extra
            lines += [f"{name}: " + "; ".join(
                f"{rule}/{m} {_result(by[(task_name, rule, m)], lambda r: r.get(key))}"
                for rule in config.rules for m in config.memories if (task_name, rule, m) in by), ""]
        sizes = sorted({int(p) for r in found for p in (r.get("accuracy_by_pairs") or {})})
        if len(sizes) > 1:
            lines += ["Accuracy by number of key-value pairs in the test sequences (trained on "
                      f"{task.train_num_pairs or [task.num_pairs]}):", "",
                      "| rule | pairs | " + " | ".join(config.memories) + " |",
                      "|---|---|" + "---|" * len(config.memories)]
            for rule in config.rules:
                for p in sizes:
                    cells = [_cell([(r.get("accuracy_by_pairs") or {}).get(str(p))
                                    for r in by.get((task_name, rule, m), [])]) for m in config.memories]
                    lines.append(f"| {rule} | {p} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Runs", "",
              "Routing health: the fraction of slots no token of an evaluation batch routes to (mean over "
              "layers), at a quarter, half and three quarters of training and at the end (a collapsing router "
              "shows as it grows).", "",
              "| run | params | state | train loss | eval loss | accuracy | tokens/s | unused slots (¼, ½, ¾, end) "
              "| routing entropy | seconds |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: r["run"]):
        routing = r.get("routing") or []
        unused_mean = lambda layers: f"{_mean_std([x['unused_fraction'] for x in layers])[0]:.2f}"  # over layers
        history = [unused_mean(h["layers"]) for h in r.get("routing_history") or []]
        unused = ", ".join(history + [unused_mean(routing)]) if routing else "—"
        entropy = _cell([x["entropy"] for x in routing], 2) if routing else "—"
        number = lambda key, fmt: "—" if r.get(key) is None else format(r[key], fmt)
        accuracy = f"diverged at step {r['diverged_step']}" if r.get("diverged") else number("accuracy", ".3f")
        lines.append(f"| {r['run']} | {_fmt_int(r['params'])} | {_fmt_int(r['state_numel'])} | "
                     f"{number('train_loss', '.3f')} | {number('eval_loss', '.3f')} | {accuracy} | "
                     f"{number('tokens_per_s', '.0f')} | {unused} | {entropy} | {r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


MARKERS = {"fm_dense": "s", "fm_sparse": "^", "mom": "D"}


def plot(config: AblateConfig, records: list[dict], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = {m: f"C{i}" for i, m in enumerate(m for m in config.memories if not is_backbone(m))}
    for task_name in config.tasks:
        found = [r for r in records if r["task"] == task_name]
        if not found:
            continue
        rules = [rule for rule in config.rules if any(r["rule"] == rule for r in found)]
        views = {"accuracy_vs_state": lambda: _plot_against_state(plt, config, found, rules, colors, out),
                 "loss_by_position": lambda: _plot_loss_by_position(plt, config, task_name, found, rules, out),
                 "accuracy_by_pairs": lambda: _plot_by_pairs(plt, config, found, rules, out)}
        paths = [views[name]() for name in TASKS[task_name].plots]
        written += [path for path in paths if path is not None]
        written.append(_plot_curves(plt, config, task_name, found, rules, out))
    return written


def _rule_panels(plt, rules, rows=1):
    """A figure with one panel per rule (columns) and `rows` rows sharing the y axis."""
    return plt.subplots(rows, len(rules), figsize=(3.6 * len(rules) + 1.6, 3.6 * rows), squeeze=False, sharey=True,
                        constrained_layout=True)


def _legend(axes, fontsize):
    """One legend for the whole figure, on its top-right panel, gathered from every panel: a panel alone
    may lack some lines (a rule whose runs of one memory all diverged) or have none, while each memory has
    the same colour and marker in every panel. A figure with no labelled line gets no legend."""
    handles = {}
    for ax in (ax for row in axes for ax in row):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        axes[0][-1].legend(list(handles.values()), list(handles), fontsize=fontsize, loc="best")


def _save(plt, fig, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_against_state(plt, config, found, rules, colors, out):
    """MQAR accuracy against total state (top) and active state (bottom), one panel per rule: the
    backbone frontier as a line, the routed memories as points (mean ± std over seeds; diverged
    runs marked x at 0)."""
    fig, axes = _rule_panels(plt, rules, rows=2)
    for row, key in enumerate(("state_numel", "active_state_numel")):
        for ax, rule in zip(axes[row], rules):
            frontier = []
            for memory in config.memories:
                rs = [r for r in found if r["rule"] == rule and r["memory"] == memory]
                if not rs:
                    continue
                mean, std = _mean_std([r["accuracy"] for r in rs if not r.get("diverged")])
                x = rs[0].get(key, rs[0]["state_numel"])
                if any(r.get("diverged") for r in rs):
                    ax.plot([x], [0], "x", color="red", markersize=9, label="diverged (at 0)")
                if mean is None:
                    continue
                if is_backbone(memory):
                    frontier.append((x, mean, std or 0, memory))
                    continue
                nudge = 2 ** (0.06 * (list(colors).index(memory) - (len(colors) - 1) / 2))  # equal x apart
                ax.errorbar([x * nudge], [mean], yerr=[std or 0], fmt=MARKERS.get(memory, "o"),
                            color=colors[memory], markersize=8, capsize=3, label=memory)
            if frontier:
                frontier.sort()
                xs, ys, es, names = zip(*frontier)
                ax.errorbar(xs, ys, yerr=es, fmt="-o", color="black", capsize=3, label="backbone frontier")
                for x, y, name in zip(xs, ys, names):
                    ax.annotate(name.replace("backbone", "bb"), (x, y), textcoords="offset points", xytext=(0, -12),
                                ha="center", fontsize=6)
            ax.set_title(rule)
            ax.grid(alpha=0.3)
            ax.set_xscale("log", base=2)
            ax.set_xlabel(("total" if row == 0 else "active") + " state (numbers per sequence)")
            ax.set_ylim(-0.05, 1.05)
        axes[row][0].set_ylabel("MQAR accuracy")
    _legend(axes, fontsize=7)
    fig.suptitle(f"{config.name}: MQAR accuracy against\ntotal state (top) and active state (bottom)")
    return _save(plt, fig, out / "accuracy_vs_state.png")


def _plot_curves(plt, config, task_name, found, rules, out):
    """The validation metric against training steps, one line per configuration (mean over seeds),
    one panel per rule: whether a configuration learns later or stops learning shows here."""
    key, direction = TASKS[task_name].selection
    fig, axes = _rule_panels(plt, rules)
    for ax, rule in zip(axes[0], rules):
        for i, memory in enumerate(config.memories):
            rs = [r for r in found if r["rule"] == rule and r["memory"] == memory and r.get("curve")
                  and not r.get("diverged")]
            if not rs:
                continue
            steps = [point["step"] for point in rs[0]["curve"]]
            means = [_mean_std([r["curve"][j][key] for r in rs if len(r["curve"]) > j])[0] for j in range(len(steps))]
            ax.plot(steps, means, marker="o", markersize=3, color=f"C{i}", ls="--" if is_backbone(memory) else "-",
                    label=memory)
        ax.set_title(rule)
        ax.grid(alpha=0.3)
        ax.set_xlabel("training step")
    axes[0][0].set_ylabel(f"validation {key.removeprefix('val_')}")
    _legend(axes, fontsize=7)
    fig.suptitle(f"{config.name}: {TASKS[task_name].title} validation "
                 f"{key.removeprefix('val_')} during training")
    return _save(plt, fig, out / f"{task_name}_training_curves.png")


def _plot_loss_by_position(plt, config, task_name, found, rules, out):
    fig, axes = _rule_panels(plt, rules)
    L = config.tasks[task_name].seq_len
    for ax, rule in zip(axes[0], rules):
        for i, memory in enumerate(config.memories):
            rs = [r for r in found if r["rule"] == rule and r["memory"] == memory and not r.get("diverged")]
            if rs:
                curves = torch.tensor([r["loss_by_position"] for r in rs]).mean(0)
                ax.plot(torch.arange(1, len(curves) + 1), curves, color=f"C{i}", label=memory)
        ax.axvline(L, color="gray", ls="--", lw=1)
        ax.text(L, 0.98, " train length", transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="gray")
        ax.set_title(rule)
        ax.grid(alpha=0.3)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position (bytes)")
    axes[0][0].set_ylabel("held-out loss so far (nats/byte)")
    _legend(axes, fontsize=8)
    fig.suptitle(f"{config.name}: byte LM loss by position")
    return _save(plt, fig, out / "lm_loss_by_position.png")


def _plot_by_pairs(plt, config, found, rules, out):
    """MQAR accuracy against the number of key-value pairs (Zoology's view), one panel per rule."""
    sizes = sorted({int(p) for r in found for p in (r.get("accuracy_by_pairs") or {})})
    if len(sizes) < 2:
        return None
    fig, axes = _rule_panels(plt, rules)
    for ax, rule in zip(axes[0], rules):
        for i, memory in enumerate(config.memories):
            rs = [r for r in found if r["rule"] == rule and r["memory"] == memory]
            if not rs:
                continue
            means = [_mean_std([(r.get("accuracy_by_pairs") or {}).get(str(p)) for r in rs])[0] for p in sizes]
            means = [float("nan") if m is None else m for m in means]
            ax.plot(sizes, means, marker=MARKERS.get(memory, "o"), color=f"C{i}", label=memory)
        ax.set_title(rule)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(p) for p in sizes])
        ax.set_xlabel("key-value pairs in the sequence")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy")
    _legend(axes, fontsize=8)
    fig.suptitle(f"{config.name}: MQAR accuracy by number of pairs")
    return _save(plt, fig, out / "mqar_accuracy_by_pairs.png")
