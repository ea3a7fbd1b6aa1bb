"""The ablation tasks. Each one makes its own data on the machine: nothing is downloaded.

- `MQAR`: multi-query associative recall as defined by the Zoology benchmark (Arora, Eyuboglu et
  al., "Zoology: measuring and improving recall in efficient language models", 2023). A sequence
  opens with `num_pairs` key-value pairs (keys from the lower half of the vocabulary, values from
  the upper half, each distinct within the sequence); then every key is asked again once, at an
  even offset into the rest of the sequence drawn from a power law (short gaps are likely:
  `P(gap = i) ~ i ** (power_a - 1)`, i = 1, 2, ...); the other positions hold random tokens. The
  model must predict, at each queried key, the value paired with it. Only those positions are
  scored (target -100 elsewhere). Training batches are fresh random sequences; the test set is
  fixed by `test_seed` and the same for every run.
- `ByteLM`: next-byte prediction on text, by default the standard library's own `.py` sources
  (every Python installation has them; files in sorted order, every `holdout_every`-th file held
  out). Trained on windows of `seq_len` bytes and evaluated on held-out windows of
  `extrapolate * seq_len` bytes, reporting the *loss so far* at each position (the mean loss of
  positions 1..t, as in the Factorization Memory paper) to see how each memory extrapolates.

A task is built from its config (`from_config`) and answers for itself: `vocab_size`, `seq_len`,
`train_batch(batch_size, generator) -> (inputs, targets)` (int64 `[B, T]`, target -100 where nothing
is scored), `validate` and `evaluate(model, device, rank, world_size) -> dict of metrics` (summed over
ranks), `probe_batch()` (inputs to look at the routing with), `provenance()` (what a run's record
says of the data), and for the report: its `title` and
`heading`, the `headline` test metric and its name, the validation metric runs are chosen by
(`selection`), a sentence on its data (`describe`), the unit of a batch (`batch_unit`), an extra
metric to report (`extra_metric`, or None) and its `plots`.
"""
from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE = -100


# ----------------------------------------------------------------------------------------- MQAR
def power_law(space: int, power_a: float) -> torch.Tensor:
    """Probabilities of the gaps 0 .. space-1 (gap i has weight (i + 1) ** (power_a - 1))."""
    weight = torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    return weight / weight.sum()


def mqar(num_examples: int, vocab_size: int, seq_len: int, num_pairs: int, power_a: float = 0.01,
         random_fill: bool = True, generator: Optional[torch.Generator] = None):
    """`num_examples` MQAR sequences: `(inputs, targets)`, int64 `[N, seq_len]` each.

    Layout: positions `0 .. 2P-1` hold key, value, key, value, ...; then key `j` is asked again at
    position `2P + 2 * gap_j` with the `gap_j` distinct and power-law distributed; its target is
    value `j`. Everything else is a random token (or 0 without `random_fill`).
    """
    check_mqar(vocab_size, seq_len, num_pairs)
    N, P, T = num_examples, num_pairs, seq_len
    half = vocab_size // 2
    # P distinct keys from 1 .. half-1 (0 marks "nothing here" before the random fill) and
    # P distinct values from half .. vocab_size-1, per sequence
    keys = torch.rand(N, half - 1, generator=generator).argsort(1)[:, :P] + 1
    values = torch.rand(N, vocab_size - half, generator=generator).argsort(1)[:, :P] + half
    space = (T - 2 * P) // 2
    gaps = torch.multinomial(power_law(space, power_a).expand(N, space), P, replacement=False,
                             generator=generator)
    inputs = torch.zeros(N, T, dtype=torch.long)
    inputs[:, 0:2 * P:2], inputs[:, 1:2 * P:2] = keys, values
    where = 2 * P + 2 * gaps
    inputs.scatter_(1, where, keys)
    targets = torch.full((N, T), IGNORE, dtype=torch.long).scatter_(1, where, values)
    if random_fill:
        fill = torch.randint(vocab_size, (N, T), generator=generator)
        inputs = torch.where(inputs == 0, fill, inputs)
    return inputs, targets


def check_mqar(vocab_size, seq_len, num_pairs, where="tasks.mqar"):
    if num_pairs < 1 or vocab_size // 2 - 1 < num_pairs:
        raise ValueError(f"{where}.num_pairs: need 1 <= num_pairs <= vocab_size // 2 - 1 = "
                         f"{vocab_size // 2 - 1} distinct keys, got {num_pairs}")
    if seq_len < 4 * num_pairs:
        raise ValueError(f"{where}.seq_len: need at least 4 * num_pairs = {4 * num_pairs} positions "
                         f"(pairs, then room for the queries), got {seq_len}")


class MQAR:
    """`num_pairs` is the size the headline `accuracy` is measured at; `test_num_pairs` adds
    test sets of other sizes (`accuracy_by_pairs`), `train_num_pairs` trains on a mix of sizes
    (each batch draws one), as Zoology does. A validation set of `test_examples` sequences, drawn
    apart from the test sets, is what runs are chosen on (`selection`)."""

    name = "mqar"
    title = "MQAR"
    headline = ("accuracy", "accuracy")  # the test metric of the tables, and its name there
    heading = "accuracy on the queried values (higher is better)"
    selection = ("val_accuracy", "max")  # the validation metric a learning-rate sweep picks by
    plots = ("accuracy_vs_state", "accuracy_by_pairs")  # besides the training curves every task has

    @classmethod
    def from_config(cls, cfg) -> "MQAR":
        return cls(cfg.vocab_size, cfg.seq_len, cfg.num_pairs, cfg.power_a, cfg.test_examples, cfg.test_seed,
                   cfg.random_fill, train_num_pairs=cfg.train_num_pairs, test_num_pairs=cfg.test_num_pairs)

    @staticmethod
    def describe(cfg, records) -> str:
        """The report's sentence on the data (`records`: the task's finished runs)."""
        return f"{cfg.num_pairs} key-value pairs in {cfg.seq_len} tokens, vocabulary {cfg.vocab_size}"

    @staticmethod
    def batch_unit(cfg) -> str:
        return "sequences"

    @staticmethod
    def extra_metric(cfg):
        return None

    def __init__(self, vocab_size=256, seq_len=128, num_pairs=16, power_a=0.01, test_examples=1000,
                 test_seed=1234, random_fill=True, eval_batch_size=None, train_num_pairs=None,
                 test_num_pairs=None):
        for p in [num_pairs, *(train_num_pairs or ()), *(test_num_pairs or ())]:
            check_mqar(vocab_size, seq_len, p)
        self.vocab_size, self.seq_len, self.num_pairs = vocab_size, seq_len, num_pairs
        self.train_num_pairs = list(train_num_pairs or [num_pairs])
        self.power_a, self.random_fill = power_a, random_fill
        self.eval_batch_size = eval_batch_size or max(1, 16384 // seq_len)  # about 16k tokens at once
        sizes = sorted({num_pairs, *(test_num_pairs or ())})
        self.tests = {p: mqar(test_examples, vocab_size, seq_len, p, power_a, random_fill,
                              torch.Generator().manual_seed(test_seed + p)) for p in sizes}
        self.test = self.tests[num_pairs]
        # the validation split, for choosing among runs (learning rates): drawn apart from the tests
        self.validation = mqar(test_examples, vocab_size, seq_len, num_pairs, power_a, random_fill,
                               torch.Generator().manual_seed(test_seed - 1 - num_pairs))

    def train_batch(self, batch_size, generator):
        pick = torch.randint(len(self.train_num_pairs), (), generator=generator).item()
        return mqar(batch_size, self.vocab_size, self.seq_len, self.train_num_pairs[pick], self.power_a,
                    self.random_fill, generator)

    @torch.no_grad()
    def _score(self, model, test, device, rank, world_size):
        inputs, targets = test
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, scored positions
        for start in range(rank * self.eval_batch_size, len(inputs), world_size * self.eval_batch_size):
            x = inputs[start:start + self.eval_batch_size].to(device)
            y = targets[start:start + self.eval_batch_size].to(device)
            logits = model(x)[0].float()
            scored = y != IGNORE
            sums[0] += F.cross_entropy(logits[scored], y[scored], reduction="sum").item()
            sums[1] += (logits[scored].argmax(-1) == y[scored]).sum().item()
            sums[2] += scored.sum().item()
        sums = _all_reduce(sums, device)
        return sums[0].item() / sums[2].item(), sums[1].item() / sums[2].item()

    def probe_batch(self):
        """Validation inputs to look at the routing with."""
        return self.validation[0][:64]

    def provenance(self) -> dict:
        """What a run's record says of the data beyond its config: nothing (the config fixes it)."""
        return {}

    @torch.no_grad()
    def validate(self, model, device, rank=0, world_size=1):
        """Loss and accuracy on the validation set."""
        loss, accuracy = self._score(model, self.validation, device, rank, world_size)
        return {"val_loss": loss, "val_accuracy": accuracy}

    @torch.no_grad()
    def evaluate(self, model, device, rank=0, world_size=1):
        """Loss and accuracy on the queried values, at `num_pairs` and at every test size."""
        scores = {p: self._score(model, test, device, rank, world_size) for p, test in self.tests.items()}
        loss, accuracy = scores[self.num_pairs]
        return {"eval_loss": loss, "accuracy": accuracy,
                "accuracy_by_pairs": {str(p): acc for p, (_, acc) in scores.items()}}


# ------------------------------------------------------------------------------------- byte LM
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files():
    """The standard library's `.py` files in sorted order, without tests and installed packages
    (which differ from one installation to the next)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_corpus(path: Optional[str] = None, holdout_every: int = 10, max_bytes: Optional[int] = None):
    """`(train, heldout, info)`: uint8 tensors of bytes, and a description of the corpus.

    `path` None or "stdlib": the standard library sources, every `holdout_every`-th file (in
    sorted order) held out. Otherwise one text file, its last `1 / holdout_every` held out.
    `max_bytes` caps the corpus (read in order) to keep start-up quick.
    """
    if path in (None, "stdlib"):
        train, heldout, size = [], [], 0
        for i, f in enumerate(stdlib_files()):
            data = f.read_bytes()
            (heldout if i % holdout_every == 0 else train).append(data)
            size += len(data)
            if max_bytes is not None and size >= max_bytes:
                break
        train, heldout, source = b"".join(train), b"".join(heldout), f"stdlib:{sysconfig.get_paths()['stdlib']}"
    else:
        data = Path(path).read_bytes()
        if max_bytes is not None:
            data = data[:max_bytes]
        cut = len(data) - len(data) // holdout_every
        train, heldout, source = data[:cut], data[cut:], str(path)
    info = {"source": source, "train_bytes": len(train), "heldout_bytes": len(heldout),
            "sha256": hashlib.sha256(train + heldout).hexdigest()[:16]}
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)
    return as_tensor(train), as_tensor(heldout), info


class ByteLM:
    """Held-out text is split in two: its first half validates (what runs are chosen on), its
    second half tests."""

    name = "lm"
    title = "Byte LM"
    vocab_size = 256
    headline = ("eval_loss", "loss at L")
    heading = "held-out loss so far (nats/byte) at the training length L (lower is better)"
    selection = ("val_loss", "min")
    plots = ("loss_by_position",)

    @classmethod
    def from_config(cls, cfg) -> "ByteLM":
        return cls(cfg.path, cfg.seq_len, cfg.extrapolate, cfg.holdout_every, cfg.max_bytes, cfg.eval_windows)

    @staticmethod
    def describe(cfg, records) -> str:
        source = records[0].get("corpus", {}).get("source", cfg.path) if records else cfg.path
        return f"Corpus: {source}, L = {cfg.seq_len}"

    @staticmethod
    def batch_unit(cfg) -> str:
        return f"x {cfg.seq_len} bytes"

    @staticmethod
    def extra_metric(cfg):
        """The loss so far at the longest evaluated length: (record key, its name in the report)."""
        return f"loss@{cfg.extrapolate}L", f"Loss so far at {cfg.extrapolate}L"

    def __init__(self, path=None, seq_len=128, extrapolate=8, holdout_every=10, max_bytes=None,
                 eval_windows=64, eval_batch_size=16):
        self.seq_len, self.extrapolate = seq_len, extrapolate
        self.eval_windows, self.eval_batch_size = eval_windows, eval_batch_size
        self.train, heldout, self.info = load_corpus(path, holdout_every, max_bytes)
        half = len(heldout) // 2
        self.validation, self.heldout = heldout[:half], heldout[half:]
        self.eval_len = seq_len * extrapolate
        for name, text, need in (("train", self.train, seq_len + 1), ("validation", self.validation, seq_len + 1),
                                 ("test", self.heldout, self.eval_len + 1)):
            if len(text) < need:
                raise ValueError(f"tasks.lm.path: the {name} text (held-out text is split in halves for "
                                 f"validation and test) has {len(text)} bytes, fewer than the {need} one window "
                                 f"needs")
        # evenly spaced windows: the same for every run
        self.eval_starts = torch.linspace(0, len(self.heldout) - self.eval_len - 1, eval_windows).long()
        self.val_starts = torch.linspace(0, len(self.validation) - seq_len - 1, eval_windows).long()

    def _windows(self, text, starts, length):
        idx = starts[:, None] + torch.arange(length + 1)
        chunk = text[idx].long()
        return chunk[:, :-1], chunk[:, 1:]

    def train_batch(self, batch_size, generator):
        starts = torch.randint(len(self.train) - self.seq_len - 1, (batch_size,), generator=generator)
        return self._windows(self.train, starts, self.seq_len)

    @torch.no_grad()
    def _so_far(self, model, text, starts, length, device, rank, world_size):
        """Loss and accuracy so far (cumulative mean over positions 1..t), `[2, length]`."""
        sums = torch.zeros(2, length, dtype=torch.float64)  # loss, correct; per position
        mine = list(range(rank * self.eval_batch_size, len(starts), world_size * self.eval_batch_size))
        for start in mine:
            x, y = self._windows(text, starts[start:start + self.eval_batch_size], length)
            x, y = x.to(device), y.to(device)
            logits = model(x)[0].float()
            loss = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")
            sums[0] += loss.sum(0).double().cpu()
            sums[1] += (logits.argmax(-1) == y).sum(0).double().cpu()
        sums = _all_reduce(sums, device) / len(starts)
        return sums.cumsum(1) / torch.arange(1, length + 1)

    def probe_batch(self):
        """Validation windows to look at the routing with."""
        return self._windows(self.validation, self.val_starts[:16], self.seq_len)[0]

    def provenance(self) -> dict:
        """What a run's record says of the data beyond its config: the corpus read (source, sizes, hash)."""
        return {"corpus": self.info}

    @torch.no_grad()
    def validate(self, model, device, rank=0, world_size=1):
        """Loss and accuracy on the validation text, at the training length."""
        so_far = self._so_far(model, self.validation, self.val_starts, self.seq_len, device, rank, world_size)
        return {"val_loss": so_far[0, -1].item(), "val_accuracy": so_far[1, -1].item()}

    @torch.no_grad()
    def evaluate(self, model, device, rank=0, world_size=1):
        """Test loss at each position 1 .. extrapolate * seq_len; `loss_by_position` is the
        loss so far (cumulative mean), `loss` is it at the training length."""
        so_far = self._so_far(model, self.heldout, self.eval_starts, self.eval_len, device, rank, world_size)
        L = self.seq_len
        out = {"eval_loss": so_far[0, L - 1].item(), "accuracy": so_far[1, L - 1].item(),
               "loss_by_position": [round(v, 4) for v in so_far[0].tolist()]}
        for factor in (1, 2, 4, 8, 16, 32):
            if factor <= self.extrapolate:
                out[f"loss@{factor}L"] = so_far[0, factor * L - 1].item()
        return out


TASKS = {"mqar": MQAR, "lm": ByteLM}  # task name in configs -> its class


def _all_reduce(t, device):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        moved = t.to(device)
        dist.all_reduce(moved)
        return moved.cpu()
    return t
