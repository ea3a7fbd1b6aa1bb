"""Experiments: task data, the model's cached decoding, config checks, the ablation grid end to end
(table, JSONL, plots, resume) and the same grid under torchrun with two gloo processes."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import memplug
from memplug.experiments import ablate
from memplug.experiments.config import load_config, presets
from memplug.experiments.report import read_results
from memplug.experiments.model import LM, MEMORIES, ModelConfig
from memplug.modules import ShortConv
from memplug.experiments.tasks import IGNORE, MQAR, ByteLM, load_corpus, mqar, power_law

RULES = memplug.BUILT_IN_RULES


# ------------------------------------------------------------------------------------------ MQAR
def test_mqar_targets_are_the_values_paired_earlier():
    V, T, P = 64, 48, 6
    inputs, targets = mqar(200, V, T, P, generator=torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (200, T) and inputs.dtype == targets.dtype == torch.long
    assert inputs.min() >= 0 and inputs.max() < V
    for x, y in zip(inputs.tolist(), targets.tolist()):
        keys, values = x[0:2 * P:2], x[1:2 * P:2]
        assert len(set(keys)) == P and all(1 <= k < V // 2 for k in keys)
        assert len(set(values)) == P and all(V // 2 <= v < V for v in values)
        scored = [t for t in range(T) if y[t] != IGNORE]
        assert len(scored) == P  # every key is asked once
        assert sorted(x[t] for t in scored) == sorted(keys)
        for t in scored:
            assert t >= 2 * P and (t - 2 * P) % 2 == 0  # after the pairs, at an even offset
            assert y[t] == values[keys.index(x[t])]  # the value paired with the queried key


def test_mqar_queries_follow_the_power_law():
    V, T, P, N = 128, 128, 4, 4000
    gen = torch.Generator().manual_seed(1)
    gaps = lambda a: ((mqar(N, V, T, P, power_a=a, generator=gen)[1] != IGNORE).nonzero()[:, 1] - 2 * P) // 2
    space = (T - 2 * P) // 2
    skewed, uniform = gaps(0.01).float(), gaps(1.0).float()
    assert skewed.max() < space and skewed.min() >= 0
    # short gaps are far more likely than long ones, unlike uniform spacing (a = 1)
    assert skewed.mean() < 0.6 * uniform.mean()
    assert abs(uniform.mean() - (space - 1) / 2) < 2
    counts = torch.bincount(skewed.long(), minlength=space)
    assert counts[:5].sum() > counts[-5:].sum() * 5
    p = power_law(space, 0.01)
    assert torch.all(p[1:] <= p[:-1]) and abs(p.sum() - 1) < 1e-12


def test_mqar_masks_and_fill():
    inputs, targets = mqar(16, 32, 16, 4, random_fill=False, generator=torch.Generator().manual_seed(2))
    asked = targets != IGNORE
    # without the random fill, everything but pairs and queries is 0
    rest = torch.ones_like(asked)
    rest[:, :8] = False
    assert torch.all(inputs[rest & ~asked] == 0) and torch.all(inputs[asked] > 0)
    task = MQAR(vocab_size=32, seq_len=16, num_pairs=4, test_examples=10)
    x, y = task.train_batch(3, torch.Generator().manual_seed(0))
    assert x.shape == (3, 16) and (y != IGNORE).sum() == 12
    with pytest.raises(ValueError, match="seq_len"):
        mqar(1, 64, 12, 4)
    with pytest.raises(ValueError, match="num_pairs"):
        mqar(1, 8, 64, 4)


# --------------------------------------------------------------------------------------- byte LM
def test_stdlib_corpus_is_deterministic_with_a_heldout_split():
    a_train, a_held, a_info = load_corpus(max_bytes=300_000)
    b_train, b_held, b_info = load_corpus(max_bytes=300_000)
    assert a_info == b_info and torch.equal(a_train, b_train) and torch.equal(a_held, b_held)
    assert len(a_held) > 0 and len(a_train) > 5 * len(a_held)
    assert a_train.dtype == torch.uint8 and "stdlib" in a_info["source"]


def test_loss_by_position_covers_eight_training_lengths(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    L = 16
    task = ByteLM(str(text), seq_len=L, extrapolate=8, eval_windows=4)
    x, y = task.train_batch(2, torch.Generator().manual_seed(0))
    assert x.shape == (2, L) and torch.equal(x[:, 1:], y[:, :-1])
    model = LM(256, ModelConfig(d_model=16, n_layers=1, num_heads=1, head_k_dim=4, head_v_dim=4), "backbone", "fm")
    metrics = task.evaluate(model.eval(), "cpu")
    curve = metrics["loss_by_position"]
    assert len(curve) == 8 * L
    assert metrics["eval_loss"] == pytest.approx(curve[L - 1], abs=1e-4)
    assert metrics["loss@8L"] == pytest.approx(curve[-1], abs=1e-4)
    assert abs(curve[0] - 5.5) < 0.5  # an untrained model: about log(256) per byte


# ------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("memory", list(MEMORIES))
def test_generate_with_cache_equals_decoding_without(rule, memory):
    torch.manual_seed(0)
    config = ModelConfig(d_model=16, n_layers=2, num_heads=2, head_k_dim=4, head_v_dim=4, num_slots=4, topk=2)
    model = LM(32, config, memory, rule).double().eval()
    prompt = torch.randint(32, (2, 7))
    fast = model.generate(prompt, 6)
    slow = model.generate(prompt, 6, use_cache=False)
    assert fast.shape == (2, 13) and torch.equal(fast[:, :7], prompt)
    assert torch.equal(fast, slow)


def test_zero_router_init_starts_every_token_on_the_same_slots():
    config = ModelConfig(d_model=16, n_layers=1, num_heads=2, head_k_dim=4, head_v_dim=4, num_slots=4, topk=2,
                         router_init="zero")
    routing = LM(32, config, "fm_sparse", "mamba2")(torch.randint(32, (3, 9)))[2]["routing"][0]
    assert routing.idx.flatten(0, 1).unique(dim=0).shape[0] == 1


def test_state_and_cost_accounting():
    """Total state counts every slot, active state the slots a token writes (R, plus MoM's shared
    slot); the FLOPs follow the documented formula; backbone_xN has N times the backbone's state."""
    H, K, V, m, R, layers = 2, 4, 6, 4, 2, 2
    config = ModelConfig(d_model=16, n_layers=layers, num_heads=H, head_k_dim=K, head_v_dim=V, num_slots=m, topk=R)
    slot = layers * H * K * V
    expected = {"backbone": (1, 1), "backbone_x3": (3, 3), "fm_dense": (m, m), "fm_sparse": (m, R),
                "mom": (m + 1, R + 1)}
    for memory, (total, active) in expected.items():
        model = LM(32, config, memory, "gated_deltanet")
        assert (model.state_numel(), model.active_state_numel()) == (total * slot, active * slot), memory
    layer = LM(32, config, "fm_sparse", "gated_deltanet").blocks[0].memory
    linear = sum(2 * mod.weight.numel() for mod in layer.modules() if isinstance(mod, torch.nn.Linear))
    conv = sum(2 * mod.weight.numel() for mod in layer.modules() if isinstance(mod, ShortConv))
    assert linear > 0 and conv > 0
    assert layer.flops_per_token() == linear + conv + H * R * (5 + 2) * K * V  # a delta rule: 5 K V per write
    additive = LM(32, config, "fm_sparse", "gla").blocks[0].memory
    recurrence = H * R * (3 + 2) * K * V
    assert additive.flops_per_token() - recurrence == sum(
        2 * mod.weight.numel() for mod in additive.modules() if isinstance(mod, (torch.nn.Linear, ShortConv)))
    wide = LM(32, config, "backbone_x3", "gla").blocks[0].memory
    assert wide.head_v_dim == 3 * V and wide.num_slots == 1


def test_budget_matching_picks_the_smallest_backbone_at_least_as_large():
    from memplug.experiments.report import _matched

    rows = [dict(rule="gla", memory=name, state_numel=state, active_state_numel=state, accuracy=acc)
            for name, state, acc in (("backbone", 10, 0.1), ("backbone_x3", 30, 0.3), ("backbone_x9", 90, 0.9))]
    metric = lambda r: r["accuracy"]
    assert _matched(rows, "gla", "state_numel", 30, metric)[0] == "backbone_x3"  # equal is enough
    assert _matched(rows, "gla", "state_numel", 31, metric)[0] == "backbone_x9"  # never less
    assert _matched(rows, "gla", "active_state_numel", 91, metric) is None
    assert _matched(rows, "mamba2", "state_numel", 1, metric) is None


def test_a_diverged_run_is_recorded_and_the_grid_goes_on(tmp_path):
    config = load_config(str(_tiny(tmp_path)), overrides=["train.lr=1e6", "train.grad_clip=0",
                                                          "tasks.mqar.train.steps=6", "tasks.lm.train.steps=6"])
    out = tmp_path / "run"
    first = ablate.run_grid(config, out, quiet=True)
    records = read_results(out / "results.jsonl")
    assert len(first["trained"]) == len(records) == 4
    diverged = [r for r in records if r["diverged"]]
    assert diverged, "a learning rate of 1e6 should diverge"
    for r in diverged:
        assert isinstance(r["diverged_step"], int) and 0 <= r["diverged_step"] < 6
        assert r["accuracy"] is None and r["eval_loss"] is None
    assert "diverged" in (out / "results.md").read_text()
    second = ablate.run_grid(config, out, quiet=True)  # resuming does not retrain a diverged run
    assert second["trained"] == [] and len(second["skipped"]) == 4


def test_a_run_trains_with_its_own_thread_count_which_is_among_its_settings(tmp_path):
    """The thread count changes a run's rounding, and a few hundred steps amplify it into different results:
    a run trains with `train.threads` threads (default 1) whatever the process had set, and the count is in
    its settings, so a grid run alone, two at a time or resumed on another machine gives the same numbers."""
    from memplug.experiments.tasks import TASKS

    config = load_config(str(_tiny(tmp_path, **{"tasks.lm": None})))
    run = ablate.grid(config)[0]
    task = TASKS[run.task].from_config(config.tasks[run.task])
    env = {"device": torch.device("cpu"), "rank": 0, "world_size": 1}
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(3 - threads)  # what the process had: not what the run asks for
            seen = set()
            record = ablate.train_run(dataclasses.replace(run, train=dataclasses.replace(run.train, threads=threads)),
                                      task, env, lambda loss: seen.add(torch.get_num_threads()))
            assert seen == {threads} and record["train"]["threads"] == threads
    finally:
        torch.set_num_threads(before)
    assert run.train.threads == 1
    assert dataclasses.replace(run, train=dataclasses.replace(run.train, threads=2)).hash != run.hash


def test_each_plot_has_one_legend_naming_every_memory_drawn(tmp_path, monkeypatch):
    """The legend sits on the last panel but names what every panel draws: here gla's fm_sparse runs all
    diverged, so its panel has no fm_sparse line (and mamba2's has no diverged mark); matplotlib warns
    of no legend where nothing is drawn."""
    import warnings

    from memplug.experiments import report

    config = load_config(str(_tiny(tmp_path, rules=["mamba2", "gla"], **{"tasks.lm": None})))
    records = []
    for rule in ("mamba2", "gla"):
        for memory, state in (("backbone", 16), ("fm_sparse", 64)):
            diverged = (rule, memory) == ("gla", "fm_sparse")
            accuracy = None if diverged else 0.5
            records.append({"task": "mqar", "rule": rule, "memory": memory, "seed": 0, "diverged": diverged,
                            "accuracy": accuracy, "state_numel": state, "active_state_numel": state // 2,
                            "curve": [{"step": 1, "val_accuracy": accuracy}, {"step": 2, "val_accuracy": accuracy}],
                            "accuracy_by_pairs": {"2": accuracy, "4": accuracy}})
    legends = {}

    def save(plt, fig, path):
        legends[path.name] = [[text.get_text() for text in ax.get_legend().get_texts()] if ax.get_legend() else None
                              for ax in fig.axes]
        plt.close(fig)
        return path

    monkeypatch.setattr(report, "_save", save)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report.plot(config, records, tmp_path)
    assert legends == {
        "accuracy_vs_state.png": [None, ["fm_sparse", "backbone frontier", "diverged (at 0)"], None, None],
        "mqar_accuracy_by_pairs.png": [None, ["backbone", "fm_sparse"]],
        "mqar_training_curves.png": [None, ["backbone", "fm_sparse"]],
    }


@pytest.mark.parametrize("rule", RULES)
def test_a_routed_memory_on_one_fixed_slot_trains_like_the_backbone(rule):
    """Factorization Memory with every token on one slot (top-1 of 4, a zero router: equal scores,
    weight 1) is the backbone: with the backbone's weights it gives the same losses over training
    steps, and its router gets no gradient. A routed memory that trained worse than this would point
    at a defect of the routed path, not at routing."""
    config = ModelConfig(d_model=16, n_layers=2, num_heads=2, head_k_dim=4, head_v_dim=4, num_slots=4, topk=1,
                         router_init="zero")
    torch.manual_seed(0)
    backbone = LM(32, config, "backbone", rule).double()
    routed = LM(32, config, "fm_sparse", rule).double()
    shared = backbone.state_dict()
    missing, unexpected = routed.load_state_dict(shared, strict=False)
    assert unexpected == [] and missing and all("router" in key for key in missing)
    train = ablate.TrainConfig(steps=5, lr=3e-2, warmup=1)
    task = MQAR(32, 16, 4, test_examples=8)
    losses = {}
    for name, model in (("backbone", backbone), ("routed", routed)):
        opt = ablate.optimizer(model, train)
        generator = torch.Generator().manual_seed(0)
        losses[name] = []
        for step in range(train.steps):
            x, y = task.train_batch(8, generator)
            logits, _, aux = model(x)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
            opt.zero_grad()
            (loss + aux["aux_loss"]).backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["backbone"][0] != losses["backbone"][-1]  # it trains
    torch.testing.assert_close(torch.tensor(losses["routed"]), torch.tensor(losses["backbone"]), rtol=1e-10, atol=0)
    for block in routed.blocks:
        assert torch.count_nonzero(block.memory.router.proj.weight) == 0


def test_memory_configurations_differ_as_described():
    config = ModelConfig(d_model=16, n_layers=2, num_heads=2, head_k_dim=4, head_v_dim=6, num_slots=4, topk=2)
    state = {m: LM(32, config, m, "gla").state_numel() for m in MEMORIES}
    per_slot = 2 * 2 * 4 * 6
    assert state == {"backbone": per_slot, "fm_dense": 4 * per_slot, "fm_sparse": 4 * per_slot,
                     "mom": 5 * per_slot, "raven": 4 * per_slot}
    layer = LM(32, config, "fm_dense", "gla").blocks[0].memory
    assert layer.topk == layer.num_slots == 4 and layer.rule.name == "gla"
    raven = LM(32, config, "raven", "gla").blocks[0].memory.router.config
    assert raven.per_head and raven.score == "sigmoid" and raven.gumbel_noise and raven.balance_rate > 0


def test_model_router_options_go_over_each_configurations_router():
    """`model.router` sets options on every routed configuration's own router (a capacity factor on
    FM and MoM here), keeps the rest of it, draws no random numbers doing so, and leaves the
    backbone (no router) as it was."""
    config = ModelConfig(d_model=16, n_layers=1, num_heads=2, head_k_dim=4, head_v_dim=6, num_slots=4, topk=2)
    capped = dataclasses.replace(config, router={"capacity_factor": 1.25})
    for memory in ("fm_sparse", "mom"):
        torch.manual_seed(0)
        plain = LM(32, config, memory, "gla")
        torch.manual_seed(0)
        routed = LM(32, capped, memory, "gla")
        own, got = plain.blocks[0].memory.router.config, routed.blocks[0].memory.router.config
        assert got.capacity_factor == 1.25 and dataclasses.replace(got, capacity_factor=0.0) == own
        for (name, a), b in zip(plain.named_parameters(), routed.parameters()):
            assert torch.equal(a, b), name
    torch.manual_seed(0)
    assert LM(32, capped, "backbone", "gla").blocks[0].memory.router is None


def test_training_updates_the_balancing_biases(tmp_path, monkeypatch):
    """`memplug ablate` moves a Raven router's bias after each optimizer step."""
    biases = []
    update = ablate.update_balance_biases

    def recorded(model):
        update(model)
        biases.append(model.blocks[0].memory.router.balance_bias.clone())
    monkeypatch.setattr(ablate, "update_balance_biases", recorded)
    config = load_config(str(_tiny(tmp_path, memories=["raven"], **{"tasks.lm": None})))
    ablate.run_grid(config, tmp_path / "run", quiet=True)
    assert len(biases) == config.train.steps and biases[-1].abs().sum() > 0


# ---------------------------------------------------------------------------------------- configs
def _tiny(tmp_path, **changes):
    text = tmp_path / "tiny.txt"
    if not text.exists():
        text.write_text("def f(x):\n    return x + 1\n" * 300)
    data = {
        "name": "tiny",
        "rules": ["fm"],
        "memories": ["backbone", "fm_sparse"],
        "seeds": [0],
        "model": {"d_model": 16, "n_layers": 1, "num_heads": 1, "head_k_dim": 4, "head_v_dim": 4,
                  "num_slots": 4, "topk": 2},
        "train": {"steps": 3, "batch_size": 4, "lr": 3e-3, "warmup": 1},
        "tasks": {"mqar": {"vocab_size": 32, "seq_len": 16, "num_pairs": 4, "test_examples": 8,
                           "test_num_pairs": [2]},
                  "lm": {"path": str(text), "seq_len": 8, "eval_windows": 4}},
    }
    for key, value in changes.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        if value is None:
            del node[last]
        else:
            node[last] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("changes, field", [
    ({"rules": ["fm", "mamba3"]}, "rules[1]"),
    ({"memories": ["backbone", "hopfield"]}, "memories[1]"),
    ({"model.topk": 5}, "model.topk"),
    ({"model.topk": 4}, "model.topk"),  # fm_sparse needs R < m
    ({"tasks.lm.path": "/nonexistent/corpus.txt"}, "tasks.lm.path"),
    ({"train.stepz": 10}, "train.stepz"),
    ({"tasks.mqar.pairs": 4}, "tasks.mqar.pairs"),
    ({"tasks.mqar.train": {"lr": "fast"}}, "tasks.mqar.train.lr"),
    ({"tasks.mqar.num_pairs": 9}, "tasks.mqar.seq_len"),
    ({"tasks.mqar.test_num_pairs": [2, 6]}, "tasks.mqar.test_num_pairs[1]"),
    ({"model.layer": {"num_slots": 2}}, "model.layer.num_slots"),
    ({"model.router_init": "ones"}, "model.router_init"),
    ({"jobs": -1}, "jobs"),
    ({"train.steps": 0}, "train.steps"),
    ({"model.d_model": "wide"}, "model.d_model"),
    ({"tasks.sudoku": {}}, "tasks.sudoku"),
    ({"model.layer": {"short_conv": False, "colour": 1}}, "model.layer"),
    ({"volume": 11}, "volume"),
    ({"train.lr": float("nan")}, "train.lr"),
    ({"train.lr": float("inf")}, "train.lr"),
    ({"train.lr": -1e-3}, "train.lr"),
    ({"tasks.mqar.train": {"lr": 0.0}}, "tasks.mqar.train.lr"),
    ({"train.min_lr_ratio": -0.1}, "train.min_lr_ratio"),
    ({"train.weight_decay": -0.1}, "train.weight_decay"),
    ({"train.grad_clip": -1.0}, "train.grad_clip"),
    ({"train.threads": -2}, "train.threads"),
    ({"train.threads": 0}, "train.threads: expected an integer >= 1"),
    ({"model.mlp_ratio": -1.0}, "model.mlp_ratio"),
    ({"tasks.mqar.power_a": -0.5}, "tasks.mqar.power_a"),
    ({"tasks.mqar.test_examples": 0}, "tasks.mqar.test_examples"),
    ({"memories": ["backbone", "backbone_x0"]}, "memories[1]"),
    ({"tasks.lm.rules": ["gla"]}, "tasks.lm.rules[0]"),
    ({"tasks.lm.rules": [], "tasks.mqar.rules": []}, "tasks: every task's rules is empty"),
    ({"lrs": [1e-3, 1e-3]}, "lrs"),
    ({"lrs": [1e-3, -1.0]}, "lrs[1]"),
    ({"model.layer": {"backend": "nope"}}, "model.layer"),
    ({"model.router": {"capacity_factor": -1.0}}, "model.router"),
    ({"model.layer": {"router": {"kind": "dense"}}}, "model.layer.router"),
] + ([({"train.device": "cuda"}, "train.device")] if not torch.cuda.is_available() else []))
def test_bad_configs_name_the_field_before_training(tmp_path, capsys, changes, field):
    path = _tiny(tmp_path, **changes)
    with pytest.raises(ValueError) as info:
        load_config(str(path))
    assert str(info.value).startswith(field)
    out = tmp_path / "out"
    assert ablate.main(["--config", str(path), "--out", str(out)]) == 2
    assert field in capsys.readouterr().err
    assert not out.exists()  # nothing ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="the triton backend runs here")
def test_a_backend_that_cannot_run_here_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the tests turn the interpreter on; a user's CPU has none
    with pytest.raises(ValueError, match=r"^model\.layer\.backend: cannot run rule 'fm' on cpu here .*not available"):
        load_config(str(_tiny(tmp_path, **{"model.layer": {"backend": "triton"}})))


def test_yaml_exponents_without_a_dot_are_floats(tmp_path):
    """YAML 1.1 reads 1e-3 as a string; where the config expects floats, it means the number."""
    path = tmp_path / "c.yaml"
    path.write_text(_tiny(tmp_path).read_text() + "lrs: [1e-3, 3e-2]\n")
    config = load_config(str(path), overrides=["train.lr=5e-3"])
    assert config.lrs == [1e-3, 3e-2] and config.train.lr == 5e-3


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nrules: [fm\nseeds: [0]\n")
    assert ablate.main(["--config", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "line" in err and "not valid YAML" in err


def test_import_makes_a_registered_rule_usable_in_a_grid(tmp_path, capsys, monkeypatch):
    """`--import MODULE` runs before the config check, so the grid can use a rule it registers."""
    import memplug

    module = tmp_path / "my_rules.py"
    module.write_text("import math\nimport memplug\nfrom memplug.rules import Coupled\n"
                      "memplug.register_rule('my_retention', family='additive_scalar', couple=lambda k, v, g, beta, w: "
                      "Coupled(w[..., None] * k, v, w * math.log(0.9), None))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _tiny(tmp_path, rules=["my_retention"])
    try:
        assert ablate.main(["--config", str(path), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
        assert "rules[0]" in capsys.readouterr().err
        assert ablate.main(["--import", "my_rules", "--config", str(path), "--out", str(tmp_path / "o"),
                            "--dry-run"]) == 0
        assert "mqar/my_retention/fm_sparse/seed0" in capsys.readouterr().out
    finally:
        if "my_retention" in memplug.available_rules():
            memplug.unregister_rule("my_retention")


def test_learning_rates_are_chosen_on_the_validation_split_then_run_at_every_seed(tmp_path):
    config = load_config(str(_tiny(tmp_path, **{"tasks.lm": None, "seeds": [0, 1], "lrs": [1e-3, 3e-2]})))
    out = tmp_path / "run"
    first = ablate.run_grid(config, out, quiet=True)
    records = read_results(out / "results.jsonl")
    assert len(first["trained"]) == len(records) == 2 * 2 + 2  # two rates at seed 0, then seed 1 at the best
    for memory in config.memories:
        sweep = {r["train"]["lr"]: r for r in records if r["memory"] == memory and r["seed"] == 0}
        assert set(sweep) == {1e-3, 3e-2}
        best = max(sorted(sweep), key=lambda lr: sweep[lr]["val_accuracy"])  # ties: the smaller rate
        (final,) = [r for r in records if r["memory"] == memory and r["seed"] == 1]
        assert final["train"]["lr"] == best and final["run"].endswith(f"/lr{best:g}/seed1")
        chosen = [r for r in first["records"] if r["memory"] == memory]
        assert sorted(r["seed"] for r in chosen) == [0, 1] and {r["train"]["lr"] for r in chosen} == {best}
        assert all(0 <= r["val_accuracy"] <= 1 and r["curve"][-1]["step"] == 3 for r in chosen)
    table = (out / "results.md").read_text()
    assert "Learning-rate sweep" in table and "**" in table
    assert (out / "mqar_training_curves.png").read_bytes()[:4] == b"\x89PNG"
    again = ablate.run_grid(config, out, quiet=True)
    assert again["trained"] == [] and len(again["skipped"]) == 6


def test_a_diverged_rate_is_never_chosen_and_ties_go_to_the_smaller_rate(tmp_path):
    config = load_config(str(_tiny(tmp_path, **{"tasks.lm": None, "memories": ["backbone"],
                                                 "lrs": [1e-3, 1e-2, 1e-1]})))
    sweep = ablate.grid(config)
    scores = {1e-3: 0.5, 1e-2: 0.5, 1e-1: None}
    records = {(run.id, run.hash): {"val_accuracy": scores[run.train.lr], "diverged": scores[run.train.lr] is None}
               for run in sweep}
    assert ablate.best_rates(config, sweep, records) == {("mqar", "fm", "backbone"): 1e-3}
    records[(sweep[1].id, sweep[1].hash)]["val_accuracy"] = 0.6
    assert ablate.best_rates(config, sweep, records) == {("mqar", "fm", "backbone"): 1e-2}
    del records[(sweep[0].id, sweep[0].hash)]  # not all rates trained yet: no choice
    assert ablate.best_rates(config, sweep, records) == {}


def test_byte_lm_validates_and_tests_on_disjoint_held_out_text(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i}: {'abcdefgh' * (i % 7)}\n" for i in range(3000)))
    task = ByteLM(str(text), seq_len=8, extrapolate=2, eval_windows=4)
    train, heldout, _ = load_corpus(str(text))
    assert torch.equal(torch.cat([task.validation, task.heldout]), heldout)
    assert len(task.validation) > 0 and len(task.heldout) > 0


def test_two_grids_cannot_write_one_folder(tmp_path):
    config = load_config(str(_tiny(tmp_path)))
    out = tmp_path / "run"
    with ablate._locked(out):
        with pytest.raises(ablate.OutputLocked, match=r"another memplug ablate \(pid \d+\) is writing there"):
            ablate.run_grid(config, out, quiet=True)
    assert not (out / "results.jsonl").exists()
    assert len(ablate.run_grid(config, out, quiet=True)["trained"]) == 4  # free again


def _default_sigint():
    # A shell starts background commands with SIGINT ignored, and a process inherits that: the grid
    # gets Ctrl-C as a terminal would send it, however pytest itself was started.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _grid_process(tmp_path, steps):
    path = _tiny(tmp_path, **{"train.steps": steps})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "memplug.cli", "ablate", "--config", str(path), "--out",
                             str(tmp_path / "out"), "--jobs", "2"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def _children(pid):
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def _wait_for_workers(process, count=2, timeout=120):
    """The grid's worker processes, once `count` of them train (their bars are on stderr)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        workers = [p for p in _children(process.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
        if len(workers) >= count:
            return workers
        time.sleep(0.2)
    raise AssertionError(f"no {count} worker processes after {timeout} s")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_killing_the_grid_leaves_no_worker_behind(tmp_path, how):
    process = _grid_process(tmp_path, steps=100000)
    workers = _wait_for_workers(process)
    process.send_signal(getattr(signal, how))
    process.wait(timeout=60)
    deadline = time.time() + 30
    while any(_alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers)


def test_ctrl_c_exits_cleanly(tmp_path):
    process = _grid_process(tmp_path, steps=100000)
    workers = _wait_for_workers(process)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in err and "interrupted" in err and "resumes" in err
    assert not any(_alive(p) for p in workers)


def test_ablate_refuses_an_out_that_is_a_file_and_negative_jobs_before_any_work(tmp_path, capsys):
    path = _tiny(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("")
    for out in (afile, afile / "sub"):
        for dry_run in ([], ["--dry-run"]):
            assert ablate.main(["--config", str(path), "--out", str(out), *dry_run]) == 2
            assert capsys.readouterr().err.strip() == f"memplug ablate: --out: {afile} exists and is not a folder"
    with pytest.raises(SystemExit) as info:
        ablate.main(["--config", str(path), "--out", str(tmp_path / "o"), "--jobs", "-1"])
    assert info.value.code == 2 and "argument --jobs: expected an integer >= 0" in capsys.readouterr().err
    assert afile.read_text() == "" and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--rule", "nosuch"], "argument --rule: 'nosuch' is not one of"),
    (["--backend", "nosuch"], "argument --backend: 'nosuch' is not one of"),
    (["--dtype", "float7"], "argument --dtype: invalid choice: 'float7'"),
    (["--m", "-3"], "argument --m: expected an integer >= 1, got -3"),
    (["--R", "9"], "argument --R: 9 routes per token exceed --m 8 slots"),
    (["--many-slots", "1"], "argument --R: 2 routes per token exceed --many-slots 1 slots"),
    (["--device", "cuda", "--sparse-m", "1"], "argument --sparse-m: its comparison routes R = 2"),
    (["--peers", "--T", "0"], "argument --T: expected an integer >= 1, got 0"),
    (["--model", "--rule", "nosuch"], "--rule: 'nosuch' is not one of"),
    (["--device", "cuda", "--rule", "kda"], "argument --rule: 'kda' is not one of"),
])
def test_bench_names_a_bad_argument_before_any_work(args, message, capsys):
    from memplug import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["bench", *args])
    captured = capsys.readouterr()
    assert info.value.code == 2 and message in captured.err and captured.out == ""


def test_bench_help_names_its_other_programs(capsys):
    from memplug import cli

    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps its lines
    assert all(program in text for program in ("--peers", "--model", "--device cuda"))


def test_output_to_a_pipe_has_no_progress_bars_and_a_closed_pipe_no_traceback(tmp_path):
    """Bars are for a terminal: in a log they are thousands of carriage returns and escape codes, and the
    line each finished run prints is the progress there. A reader that stops early (`| head`) is no error
    worth a traceback."""
    path = _tiny(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "memplug.cli", "ablate", "--config", str(path), "--out",
                           str(tmp_path / "out"), "--jobs", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stderr and "\x1b[" not in done.stderr
    assert sum("mqar/fm/" in line or "lm/fm/" in line for line in (done.stdout + done.stderr).splitlines()) >= 4
    buffered = {k: v for k, v in env.items() if k != "PYTHONUNBUFFERED"}  # as a pipe's output is by default
    listing = subprocess.Popen([sys.executable, "-m", "memplug.cli", "ablate", "--preset", "study", "--out",
                                str(tmp_path / "study"), "--dry-run"], env=buffered, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    listing.stdout.close()  # before it writes a line (importing torch takes it longer than this)
    err = listing.stderr.read()
    assert listing.wait(timeout=120) == 1 and "Traceback" not in err, err


def test_presets_parse():
    assert {"quick", "paper"} <= set(presets())
    paper = load_config(preset="paper")
    assert list(paper.rules) == list(RULES) and set(MEMORIES) <= set(paper.memories)
    assert {"backbone_x3", "backbone_x9"} <= set(paper.memories)
    assert set(paper.tasks) == {"mqar", "lm"} and len(paper.seeds) == 3 and len(paper.lrs) == 3
    assert len(ablate.grid(paper)) == 6 * 7 * 2 * 3  # the sweep; then 2 more seeds per configuration
    quick = load_config(preset="quick")
    assert "mqar" in quick.tasks and "backbone" in quick.memories
    study = load_config(preset="study")
    # the rules of its committed runs: every built-in rule but kda, which came after them
    assert list(study.rules) == [r for r in RULES if r != "kda"] and len(study.lrs) >= 3 and len(study.seeds) >= 3
    assert {"backbone", "backbone_x3", "backbone_x9", "fm_dense", "fm_sparse", "mom"} <= set(study.memories)
    assert study.tasks["lm"].rules == ["mamba2", "gated_deltanet"]
    sweep = ablate.grid(study)  # every configuration at every rate, seed 0; the task's rules only for lm
    assert len(sweep) == (5 + 2) * len(study.memories) * len(study.lrs)
    assert {run.rule for run in sweep if run.task == "lm"} == {"mamba2", "gated_deltanet"}
    # a rule the study came before, on MQAR alone: an empty list leaves a task out
    kda = load_config(preset="study", overrides=["rules=[kda]", "tasks.lm.rules=[]"])
    assert {(run.task, run.rule) for run in ablate.grid(kda)} == {("mqar", "kda")}
    with pytest.raises(ValueError, match="--preset"):
        load_config(preset="nope")


def test_a_built_wheel_ships_every_preset(tmp_path):
    """`memplug ablate --preset NAME` reads configs/NAME.yaml beside the installed package: a wheel (not
    the editable install the tests run from) must carry every preset, and setuptools must not warn that
    their folder is a package it would leave out."""
    import shutil
    import zipfile

    # from a copy of the sources: a checkout's build/ (left by any earlier build) would lend the wheel its files
    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"
    for package in ("memplug", "backends", "adapters", "experiments"):
        shutil.copytree(root / package, source / package, ignore=shutil.ignore_patterns("results", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path), str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    assert "absent from the `packages` configuration" not in build.stdout + build.stderr
    (wheel,) = tmp_path.glob("memplug-*.whl")
    shipped = {Path(name).stem for name in zipfile.ZipFile(wheel).namelist()
               if name.startswith("memplug/experiments/configs/") and name.endswith(".yaml")}
    assert shipped == set(presets())


# ------------------------------------------------------------------------------- the grid itself
def test_code_version_names_the_commit():
    """Runs record the memplug code they trained with: in a git checkout, its commit (what
    `git describe` says, "-dirty" with local changes)."""
    import memplug

    root = Path(memplug.__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("memplug is not a git checkout here")
    assert ablate.code_version().startswith(head.stdout.strip())


def test_git_version_is_dirty_for_code_changes_not_for_committed_results(tmp_path):
    """A grid appends to its committed results.jsonl while it runs: that must not mark the code it
    trains with as modified; a change to any other tracked file must."""
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    (tmp_path / "experiments" / "results").mkdir(parents=True)
    (tmp_path / "rules.py").write_text("a = 1\n")
    (tmp_path / "experiments" / "results" / "results.jsonl").write_text("{}\n")
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "c"]):
        subprocess.run(git + args, check=True, capture_output=True)
    head = subprocess.run(git + ["rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert ablate.git_version(tmp_path) == head
    with open(tmp_path / "experiments" / "results" / "results.jsonl", "a") as f:
        f.write("{}\n")
    assert ablate.git_version(tmp_path) == head
    (tmp_path / "rules.py").write_text("a = 2\n")
    assert ablate.git_version(tmp_path) == head + "-dirty"
    assert ablate.git_version(tmp_path / "experiments") == head + "-dirty"  # from a subfolder too
    assert ablate.git_version(tmp_path.parent / "not-a-checkout-here") is None


def test_grid_writes_table_jsonl_plots_and_resumes(tmp_path):
    config = load_config(str(_tiny(tmp_path)))
    out = tmp_path / "run"
    first = ablate.run_grid(config, out, quiet=True)
    assert len(first["trained"]) == 4 and not first["skipped"]
    lines = (out / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert sorted(r["run"] for r in records) == sorted(first["trained"])
    for r in records:
        for key in ("params", "memory_params", "state_numel", "active_state_numel", "memory_flops_per_token",
                    "steps", "train_loss", "eval_loss", "accuracy", "tokens_per_s", "routing", "routing_history",
                    "config_hash", "model", "train"):
            assert key in r, key
        assert r["diverged"] is False and r["diverged_step"] is None
        assert r["steps"] == 3
        assert 0 < r["cpu_seconds"] and r["code"] == ablate.code_version()
        assert (r["routing"] == []) == (r["memory"] == "backbone")
    lm = [r for r in records if r["task"] == "lm"]
    assert all(len(r["loss_by_position"]) == 8 * 8 for r in lm)
    mqar_records = [r for r in records if r["task"] == "mqar"]
    assert all(set(r["accuracy_by_pairs"]) == {"2", "4"} and r["accuracy_by_pairs"]["4"] == r["accuracy"]
               for r in mqar_records)
    table = (out / "results.md").read_text()
    assert "| rule | memory | total state | active state |" in table and "| fm | fm_sparse |" in table
    assert "| fm | fm_sparse | " in table.split("at equal budget")[1]  # the budget-matched comparison
    assert "| fm | 2 |" in table  # accuracy by number of pairs
    for png in ("accuracy_vs_state.png", "mqar_accuracy_by_pairs.png", "lm_loss_by_position.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    # a run killed while writing leaves a cut line: it is skipped, and the others are not rerun
    with open(out / "results.jsonl", "a") as f:
        f.write('{"run": "mqar/fm/ba')
    second = ablate.run_grid(config, out, quiet=True)
    assert second["trained"] == [] and len(second["skipped"]) == 4
    assert len(read_results(out / "results.jsonl")) == 4

    # changing a setting reruns only what it changes; here two runs at once, in two processes
    config.tasks["mqar"].train = {"steps": 2}
    third = ablate.run_grid(config, out, quiet=True, jobs=2)
    assert sorted(third["trained"]) == ["mqar/fm/backbone/seed0", "mqar/fm/fm_sparse/seed0"]
    assert {r["run"]: r["steps"] for r in third["records"] if r["task"] == "mqar"} == {
        "mqar/fm/backbone/seed0": 2, "mqar/fm/fm_sparse/seed0": 2}


def test_cli_dry_run_lists_the_grid(tmp_path, capsys):
    path = _tiny(tmp_path)
    assert ablate.main(["--config", str(path), "--out", str(tmp_path / "o"), "--dry-run",
                        "--set", "seeds=[0, 1]"]) == 0
    runs = capsys.readouterr().out.split("\n")
    assert sum(1 for line in runs if line.strip()) == 2 * 2 * 2


def test_torchrun_two_gloo_processes(tmp_path):
    path = _tiny(tmp_path, memories=["backbone", "raven"])  # raven: balancing biases from the global load
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "memplug.cli", "ablate", "--config", str(path), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_results(out / "results.jsonl")
    assert len(records) == 4  # rank 0 alone writes
    assert all(r["world_size"] == 2 for r in records)
    assert all(r["ddp_param_drift"] == 0 for r in records)  # the two replicas stayed identical
    assert (out / "results.md").exists()
