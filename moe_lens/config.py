"""Run configuration: one flat dataclass, the `--mode` presets, and validation.

`RunConfig` is the single source of every default (the CLI is generated from its fields).
`MODES` maps each gating variant researchers compare to the fields it sets; build a config as
``RunConfig.for_mode("hybrid", dataset="wikitext2")`` (= ``RunConfig(**{**MODES["hybrid"], ...})``).

Presets follow the papers they name:
- Shazeer et al. 2017 ("Outrageously large neural networks"): noisy top-k gating, importance and
  load losses (w = 0.1 each, as the SAiDL 2024 report and Shazeer's LSTM experiments use).
- Fedus et al. 2021 (Switch Transformer): top-1, balance loss alpha = 0.01, capacity factor 1.25.
- Zhou et al. 2022 (expert choice): each expert takes its top ceil(c * n / e) tokens, c = 2.
- Roller et al. 2021 (hash layers): expert = fixed hash of the token id.
- Wang et al. 2024 (auxiliary-loss-free balancing, DeepSeek-V3): `sigmoid_bias`, top-k on sigmoid score + bias.
- The 2025 LSTM-MoE study (shared/references/001): `lora` and `hybrid` (switch + LoRA rank 8).

Dense baselines: `dense` is one expert of `expert_hidden` units. `dense_flops` and `dense_params` are
one expert matched to the MoE the other fields describe (`for_mode` resolves them from the given or
default top_k, num_experts and expert_hidden, then sets num_experts = top_k = 1): `dense_flops` has
hidden top_k * expert_hidden (the expert FLOPs per token of a top-k MoE), `dense_params` hidden
num_experts * expert_hidden (the MoE's expert weights). `dense_match` ("flops" / "params") records it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

DATASETS = ("wikitext2", "conll2003", "squad")
# The keys of moe/registry.py's ROUTERS and EXPERT_BANKS, in order (copied here to keep this module
# torch-free; tests/test_moe_registry.py fails when they differ).
ROUTERS = ("dense", "naive_topk", "topk_mask", "noisy_topk", "switch", "expert_choice", "hash", "sigmoid_bias")
EXPERT_TYPES = ("mlp", "lora", "lowrank", "shared", "ttlora")
DENSE_MATCHES = ("flops", "params")

# What router "dense" means, written once: one expert, every token to it (MODES, RunConfig and MoELayer read it).
DENSE_SHAPE: dict[str, int] = dict(num_experts=1, top_k=1)
_NOISY2 = dict(router="noisy_topk", top_k=2)
MODES: dict[str, dict[str, Any]] = {
    "dense": dict(router="dense", **DENSE_SHAPE),  # the LSTM baseline: one expert, no routing
    "naive_topk": dict(router="naive_topk", top_k=2),
    "topk_mask": dict(router="topk_mask", top_k=2),
    "noisy_topk": dict(_NOISY2),
    "importance": dict(router="topk_mask", top_k=2, w_importance=0.1),
    "load": dict(_NOISY2, w_load=0.1),
    "baseline": dict(_NOISY2, w_importance=0.1, w_load=0.1),
    "switch": dict(router="switch", top_k=1, w_switch=0.01, capacity_factor=1.25),
    "lora": dict(_NOISY2, expert_type="lora", rank=8, w_importance=0.1, w_load=0.1),
    "hybrid": dict(router="switch", top_k=1, expert_type="lora", rank=8, w_switch=0.01, capacity_factor=1.25),
    "lowrank": dict(_NOISY2, expert_type="lowrank", rank=32, w_importance=0.1, w_load=0.1),
    "shared": dict(_NOISY2, expert_type="shared", w_importance=0.1, w_load=0.1),
    "expert_choice": dict(router="expert_choice", top_k=2, capacity_factor=2.0),
    "hash": dict(router="hash", top_k=1),
    "sigmoid_bias": dict(router="sigmoid_bias", top_k=2),  # no aux loss: balanced by a bias (moe/sigmoid_bias.py)
    # one expert matched to the MoE of the given top_k / num_experts / expert_hidden (see `for_mode`)
    "dense_flops": dict(router="dense", dense_match="flops"),
    "dense_params": dict(router="dense", dense_match="params"),
}
for _name, _preset in MODES.items():
    _preset["mode"] = _name

# The allowed values of every enumerated field (validation, argparse choices and --help read this).
CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": DATASETS, "mode": tuple(MODES), "router": ROUTERS, "expert_type": EXPERT_TYPES,
    "router_init": ("default", "zeros"), "dispatch": ("auto", "grouped", "loop"),
    "device": ("auto", "cpu", "cuda", "cuda:N"),
}

# `moe-lens train --quick`: the committed sample runs' recipe per dataset (trainers/sample_runs.py), recorded,
# with 5,000 hidden states per split for the Clusters page. A few minutes on a 2-core CPU. "glove" is
# GLOVE_50D under the data directory (the CLI resolves it). Explicit flags override these; these override --mode.
GLOVE_50D = "glove/glove.6B.50d.subset.txt"
_QUICK_COMMON = dict(d_model=128, expert_hidden=128, warmup_steps=50, record=True, record_every=25,
                     hidden_sample=5000)  # fmt: skip
QUICK: dict[str, dict[str, Any]] = {
    "wikitext2": dict(_QUICK_COMMON, vocab_size=10_000, d_embed=128, batch_size=32, lr=2e-3, clip=0.25,
                      weight_decay=0.0, dropout=0.1, epochs=2, epoch_steps=150),  # fmt: skip
    "conll2003": dict(_QUICK_COMMON, embeddings="glove", d_embed=50, lr=2e-3, dropout=0.3, epochs=3,
                      epoch_steps=150, record_every=30),  # fmt: skip
    "squad": dict(_QUICK_COMMON, embeddings="glove", d_embed=50, lr=2e-3, dropout=0.2, epochs=2, epoch_steps=25),
}


@dataclass
class RunConfig:
    # data
    dataset: str = "wikitext2"  # task: wikitext2 (language model), conll2003 (NER tagger), squad (span QA)
    data_dir: str | None = None  # dataset files; None: $MOE_LENS_DATA, else ~/.cache/moe-lens/data (WikiText-2 and SQuAD downloaded there when missing)
    vocab_size: int | None = None  # cap: most frequent N words + <unk> (None = full vocabulary)
    max_len: int | None = None  # sequence cap in tokens; None: 128 for CoNLL, 256 for SQuAD segments
    pos_tags: bool = True  # spaCy POS tags for WikiText/SQuAD tokens (computed once, cached)
    bptt: int = 35  # WikiText-2 truncated-backprop length
    # model
    mode: str = "noisy_topk"  # gating-variant preset (README table); explicit flags override its fields
    d_embed: int = 256  # word embedding size (50 with the GloVe 50d file)
    d_model: int = 256  # LSTM hidden size per direction; MoE d = d_model (LM) or 2 * d_model (BiLSTMs)
    dropout: float = 0.2  # dropout on embeddings and LSTM outputs
    tie_weights: bool = False  # LM only; needs d_embed == d_model
    embeddings: str | None = None  # GloVe text file to initialise the embedding from
    freeze_embeddings: bool = False  # keep the (GloVe) embedding fixed during training
    case_features: bool = False  # CoNLL: add a small embedding of each token's casing (Title, UPPER, digits...)
    num_layers: int = 2  # stacked LSTM layers (BiLSTM layers for the tagger and QA)
    moe_layers: str = "1"  # the 1-based LSTM layers followed by an MoE layer: "1", "1,2", ... or "all"
    # router
    router: str = "noisy_topk"  # how tokens pick experts (set by --mode; see moe/routers.py)
    num_experts: int = 8  # experts in the MoE layer (e)
    top_k: int = 2  # experts per token (k); switch and hash route to 1
    expert_type: str = "mlp"  # expert bank: mlp, lora (shared base + adapters), lowrank (U V), shared (+ always-on expert)
    expert_hidden: int = 128  # hidden units of each expert MLP (Shazeer's experts are 2-layer ReLU MLPs)
    rank: int = 8  # LoRA / low-rank rank
    tt_rank: int = 4  # ttlora: rank of the tensor-train cores of each expert's delta W (moe/ttlora.py)
    lora_train_base: bool = True  # False freezes the shared base MLP of LoRA experts
    dense_match: str | None = None  # "flops" / "params": set by the dense_flops / dense_params presets
    lora_alpha: float = 8.0  # LoRA update scaled by lora_alpha / rank (Hu et al. 2021); 8 = the presets' rank: scale 1
    capacity_factor: float | None = None  # switch: tokens per expert = cf * n / e; expert_choice: c
    noise_eps: float = 1e-2  # added to softplus(x W_noise) so the load estimator never divides by 0
    bias_update_rate: float = 1e-2  # sigmoid_bias: u in b_i += u*sign(mean load - load_i), load a 0.9-EMA over steps;
    # 1e-2 keeps max/mean load <= 1.17 per 50-step window of a 300-step WikiText-2 run (3 seeds; topk_mask 3.79-4.00
    # after step 50), Wang et al.'s 1e-3 leaves it imbalanced (benchmarks/bench_sigmoid_bias.py, docs/moe.md)
    router_init: str = "default"  # "zeros": W_g = 0 as Shazeer 2017 (ties then pick experts 0..k-1)
    dispatch: str = "auto"  # auto | grouped | loop (see moe/layer.py)
    w_importance: float = 0.0  # weight of the importance CV^2 loss (Shazeer 2017)
    w_load: float = 0.0  # weight of the smooth load CV^2 loss (Shazeer 2017; needs router noisy_topk)
    w_switch: float = 0.0  # weight of the Switch balance loss e * sum_i f_i P_i (Fedus 2021)
    w_z: float = 0.0  # router z-loss (ST-MoE)
    # optim
    epochs: int = 1  # passes over the training split (each capped by epoch_steps)
    max_steps: int | None = None  # stop after this many optimizer steps (tests, smoke runs)
    epoch_steps: int | None = None  # cap every epoch at its first N batches (short runs with several epochs)
    batch_size: int = 32  # sequences per step (WikiText-2: parallel streams)
    lr: float = 2e-3  # AdamW peak learning rate
    weight_decay: float = 0.01  # AdamW weight decay
    clip: float = 1.0  # gradient-norm clipping threshold
    warmup_steps: int = 100  # linear learning-rate warm-up steps
    seed: int = 0  # seeds torch, numpy and the data shuffle
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    checkpoint_every: int | None = None  # mid-epoch checkpoint every N steps; None: every 10 minutes of wall time
    # recording
    record: bool = False  # write routing traces (tokens/, routing/, hidden/) for the app and SQL
    record_every: int = 100  # record a training batch every N steps
    record_probs: bool = False  # full router probabilities (n, e) per token
    hidden_sample: int = 20000  # hidden states per split per recorded epoch
    hidden_bf16: bool = False  # store hidden states rounded to bfloat16 precision (about half the bytes)
    record_flush_rows: int = 1_000_000  # routing rows buffered per partition before a part file is written
    max_eval_batches: int | None = None  # evaluate (and record) only the first N batches: smoke runs only
    record_tokens: int | None = None  # keep eval traces of the first N tokens of a split only (metrics still
    # cover the whole split); the train tokens table then holds only the tokens of recorded batches
    tensorboard: bool = False  # also write scalars to <run>/tensorboard (needs the tensorboard package)
    runs_dir: str = "runs"  # where run directories are created
    run_name: str | None = None  # run directory name; None: <dataset>-<mode>-<YYYYmmdd-HHMMSS>

    def __post_init__(self) -> None:
        for name, rule in NUMERIC_RANGES.items():  # first: the checks below compare numbers
            rule.check(name, getattr(self, name))
        if self.router == "dense":  # one expert whatever num_experts/top_k say, so config.json tells the truth
            self.num_experts, self.top_k = DENSE_SHAPE["num_experts"], DENSE_SHAPE["top_k"]
        _check_choice("mode", self.mode, MODES)
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("router", self.router, ROUTERS)
        _check_choice("expert_type", self.expert_type, EXPERT_TYPES)
        _check_choice("router_init", self.router_init, ("default", "zeros"))
        _check_choice("dispatch", self.dispatch, ("auto", "grouped", "loop"))
        if self.dense_match is not None:
            _check_choice("dense_match", self.dense_match, DENSE_MATCHES)
            if self.router != "dense" or self.num_experts != 1:
                raise ValueError(f"dense_match={self.dense_match!r} with router {self.router!r} and num_experts="
                                 f"{self.num_experts}; allowed: router 'dense', one expert (--mode dense_{self.dense_match})")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} > num_experts={self.num_experts}; allowed: 1..{self.num_experts}")
        if self.router == "switch" and self.top_k != 1:
            raise ValueError(f"top_k={self.top_k} with router 'switch'; allowed: 1 (Switch routes each token to one expert)")
        if self.w_load > 0 and self.router != "noisy_topk":
            raise ValueError(f"w_load={self.w_load} with router {self.router!r}; the smooth load loss needs router 'noisy_topk'")
        self.moe_after()  # raises on a bad moe_layers

    def moe_after(self) -> list[int]:
        """The 1-based LSTM layers followed by an MoE layer, ascending (`moe_layers` parsed and checked)."""
        NUMERIC_RANGES["num_layers"].check("num_layers", self.num_layers)
        allowed = f"'all' or a comma-separated list of 1..{self.num_layers}"
        if str(self.moe_layers).strip() == "all":
            return list(range(1, self.num_layers + 1))
        try:
            layers = sorted({int(x) for x in str(self.moe_layers).split(",")})
        except ValueError:
            raise ValueError(f"moe_layers={self.moe_layers!r}; allowed: {allowed}") from None
        if not layers or layers[0] < 1 or layers[-1] > self.num_layers:
            raise ValueError(f"moe_layers={self.moe_layers!r} with num_layers={self.num_layers}; allowed: {allowed}")
        return layers

    @classmethod
    def for_mode(cls, mode: str, **overrides: Any) -> "RunConfig":
        """The preset of `mode`, then `overrides` on top (any field). For `dense_flops` / `dense_params`
        the given (else default) top_k, num_experts and expert_hidden describe the MoE to match: the
        result is one expert of hidden top_k * expert_hidden / num_experts * expert_hidden."""
        _check_choice("mode", mode, MODES)
        merged = {**MODES[mode], **overrides}
        match = merged.get("dense_match")
        if match in DENSE_MATCHES and merged.get("router") == "dense" and merged.get("num_experts", 0) != 1:
            default = {f.name: f.default for f in fields(cls)}
            k, e, h = (merged.get(n, default[n]) for n in ("top_k", "num_experts", "expert_hidden"))
            if k > e:
                raise ValueError(f"top_k={k} > num_experts={e}; allowed: 1..{e} (the MoE --mode dense_{match} matches)")
            merged.update(expert_hidden=(k if match == "flops" else e) * h, num_experts=1, top_k=1)
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """Inverse of `to_dict`, ignoring keys that are not fields (versions, device, ...)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _check_choice(name: str, value: Any, allowed: Any) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


class Range(NamedTuple):
    """The values a numeric field accepts: its type, bounds (open or closed) and whether None is allowed."""

    kind: type  # int or float (a float field also takes an int; neither takes a bool)
    lo: float | None = None
    lo_open: bool = False  # True: value > lo, else value >= lo
    hi: float | None = None
    hi_open: bool = True  # True: value < hi, else value <= hi
    optional: bool = False  # None allowed (it means "no limit" / "automatic", see the field's comment)

    def allowed(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {_num(self.lo)}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {_num(self.hi)}")
        text = " and ".join(parts) or "finite"
        text = f"an integer {text}" if self.kind is int else text
        return text + (", or None" if self.optional else "")

    def check(self, name: str, value: Any) -> None:
        if value is None and self.optional:
            return
        ok = not isinstance(value, bool) and isinstance(value, (int,) if self.kind is int else (int, float))
        ok = ok and math.isfinite(value)
        if ok and self.lo is not None:
            ok = value > self.lo if self.lo_open else value >= self.lo
        if ok and self.hi is not None:
            ok = value < self.hi if self.hi_open else value <= self.hi
        if not ok:
            raise ValueError(f"{name}={value!r}; allowed: {self.allowed()}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


_POS, _NONNEG, _COUNT = Range(float, 0, lo_open=True), Range(float, 0), Range(int, 1)
# Every int and float field of RunConfig, one line each (tests/test_config.py fails on a field missing here).
NUMERIC_RANGES: dict[str, Range] = {
    "vocab_size": Range(int, 2, optional=True),
    "max_len": Range(int, 1, optional=True),
    "bptt": _COUNT,
    "d_embed": _COUNT,
    "d_model": _COUNT,
    "dropout": Range(float, 0, hi=1),
    "num_layers": _COUNT,
    "num_experts": _COUNT,
    "top_k": _COUNT,
    "expert_hidden": _COUNT,
    "rank": _COUNT,
    "tt_rank": _COUNT,
    "lora_alpha": _POS,
    "capacity_factor": Range(float, 0, lo_open=True, optional=True),
    "noise_eps": _POS,
    "bias_update_rate": _NONNEG,
    "w_importance": _NONNEG,
    "w_load": _NONNEG,
    "w_switch": _NONNEG,
    "w_z": _NONNEG,
    "epochs": _COUNT,
    "max_steps": Range(int, 1, optional=True),
    "epoch_steps": Range(int, 1, optional=True),
    "batch_size": _COUNT,
    "lr": _POS,
    "weight_decay": _NONNEG,
    "clip": _POS,
    "warmup_steps": Range(int, 0),
    "seed": Range(int, 0, hi=2**32, hi_open=True),  # numpy's seed range
    "checkpoint_every": Range(int, 1, optional=True),
    "record_every": _COUNT,
    "hidden_sample": Range(int, 0),
    "record_flush_rows": _COUNT,
    "max_eval_batches": Range(int, 1, optional=True),
    "record_tokens": Range(int, 1, optional=True),
}


__all__ = ["RunConfig", "NUMERIC_RANGES", "Range", "MODES", "DATASETS", "ROUTERS", "EXPERT_TYPES", "CHOICES", "QUICK"]
