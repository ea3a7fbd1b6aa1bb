"""Experiments: task data, the model's cached decoding, config checks, the ablation grid end to end
(table, JSONL, plots, resume) and the same grid under torchrun with two gloo processes."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from memplug.experiments import ablate
from memplug.experiments.config import load_config, presets
from memplug.experiments.report import read_results
from memplug.experiments.model import LM, MEMORIES, ModelConfig
from memplug.experiments.tasks import IGNORE, MQAR, ByteLM, load_corpus, mqar, power_law

RULES = ["mamba2", "gla", "deltanet", "gated_deltanet", "fm"]


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


def test_memory_configurations_differ_as_described():
    config = ModelConfig(d_model=16, n_layers=2, num_heads=2, head_k_dim=4, head_v_dim=6, num_slots=4, topk=2)
    state = {m: LM(32, config, m, "gla").state_numel() for m in MEMORIES}
    per_slot = 2 * 2 * 4 * 6
    assert state == {"backbone": per_slot, "fm_dense": 4 * per_slot, "fm_sparse": 4 * per_slot,
                     "mom": 5 * per_slot}
    layer = LM(32, config, "fm_dense", "gla").blocks[0].memory
    assert layer.topk == layer.num_slots == 4 and layer.rule.name == "gla"


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
])
def test_bad_configs_name_the_field_before_training(tmp_path, capsys, changes, field):
    path = _tiny(tmp_path, **changes)
    with pytest.raises(ValueError) as info:
        load_config(str(path))
    assert str(info.value).startswith(field)
    out = tmp_path / "out"
    assert ablate.main(["--config", str(path), "--out", str(out)]) == 2
    assert field in capsys.readouterr().err
    assert not out.exists()  # nothing ran


def test_presets_parse():
    assert {"quick", "paper"} <= set(presets())
    paper = load_config(preset="paper")
    assert paper.rules == RULES and set(paper.memories) == set(MEMORIES)
    assert set(paper.tasks) == {"mqar", "lm"} and len(paper.seeds) == 3
    assert len(ablate.grid(paper)) == 5 * 4 * 2 * 3
    quick = load_config(preset="quick")
    assert "mqar" in quick.tasks and "backbone" in quick.memories
    with pytest.raises(ValueError, match="--preset"):
        load_config(preset="nope")


# ------------------------------------------------------------------------------- the grid itself
def test_grid_writes_table_jsonl_plots_and_resumes(tmp_path):
    config = load_config(str(_tiny(tmp_path)))
    out = tmp_path / "run"
    first = ablate.run_grid(config, out, quiet=True)
    assert len(first["trained"]) == 4 and not first["skipped"]
    lines = (out / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert sorted(r["run"] for r in records) == sorted(first["trained"])
    for r in records:
        for key in ("params", "state_numel", "steps", "train_loss", "eval_loss", "accuracy", "tokens_per_s",
                    "routing", "config_hash", "model", "train"):
            assert key in r, key
        assert r["steps"] == 3
        assert (r["routing"] == []) == (r["memory"] == "backbone")
    lm = [r for r in records if r["task"] == "lm"]
    assert all(len(r["loss_by_position"]) == 8 * 8 for r in lm)
    mqar_records = [r for r in records if r["task"] == "mqar"]
    assert all(set(r["accuracy_by_pairs"]) == {"2", "4"} and r["accuracy_by_pairs"]["4"] == r["accuracy"]
               for r in mqar_records)
    table = (out / "results.md").read_text()
    assert "| rule | backbone" in table and "fm_sparse" in table and "| fm |" in table
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
    path = _tiny(tmp_path)
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
