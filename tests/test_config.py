"""RunConfig validation: bad values raise ValueError naming the value and the allowed range."""
from __future__ import annotations

import pytest

from moe_lens.config import MODES, RunConfig


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(top_k=9, num_experts=8), "top_k=9 > num_experts=8; allowed: 1..8"),
        (dict(mode="bogus"), "unknown mode 'bogus'; allowed: dense, naive_topk"),
        (dict(expert_type="conv"), "unknown expert_type 'conv'; allowed: mlp, lora, lowrank, shared"),
        (dict(router="random"), "unknown router 'random'"),
        (dict(rank=0), "rank=0; allowed: an integer >= 1"),
        (dict(rank=-3), "rank=-3"),
        (dict(capacity_factor=0.0), "capacity_factor=0.0; allowed: > 0"),
        (dict(capacity_factor=-1.0), "capacity_factor=-1.0"),
        (dict(num_experts=0, top_k=1), "num_experts=0"),
        (dict(dataset="imagenet"), "unknown dataset 'imagenet'; allowed: wikitext2, conll2003, squad"),
        (dict(router="switch", top_k=2), "top_k=2 with router 'switch'"),
        (dict(router="topk_mask", w_load=0.1), "w_load=0.1 with router 'topk_mask'"),
        (dict(dropout=1.0), "dropout=1.0"),
    ],
)
def test_invalid_configuration_names_value_and_allowed_range(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        RunConfig(**kwargs)
    assert needle in str(err.value)


def test_every_mode_builds_and_round_trips() -> None:
    for mode in MODES:
        cfg = RunConfig.for_mode(mode, dataset="conll2003", num_experts=4 if mode != "dense" else 1)
        assert cfg.mode == mode
        assert RunConfig.from_dict({**cfg.to_dict(), "versions": {}}) == cfg


def test_mode_fields_stay_overridable() -> None:
    cfg = RunConfig.for_mode("hybrid", num_experts=16, rank=4, w_switch=0.1, capacity_factor=2.0, noise_eps=0.1)
    assert (cfg.router, cfg.expert_type, cfg.num_experts, cfg.rank, cfg.w_switch) == ("switch", "lora", 16, 4, 0.1)
    with pytest.raises(ValueError, match="unknown mode"):
        RunConfig.for_mode("nope")


# ---- every numeric field from one table (issue 19 item 8) -----------------------------------------
import math  # noqa: E402
import types  # noqa: E402
import typing  # noqa: E402
from pathlib import Path  # noqa: E402

from moe_lens.config import NUMERIC_RANGES  # noqa: E402


def numeric_fields() -> dict[str, tuple[type, bool]]:
    """{field: (int or float, None allowed)} for every int/float field of RunConfig, read from its annotations."""
    out = {}
    for name, tp in typing.get_type_hints(RunConfig).items():
        args = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
        base = [a for a in args if a is not type(None)]
        if base in ([int], [float]):
            out[name] = (base[0], type(None) in args)
    return out


def test_every_numeric_field_has_a_range() -> None:
    found = numeric_fields()
    assert len(found) >= 30 and {"clip", "lr", "warmup_steps", "seed", "dropout"} <= set(found)
    assert set(found) == set(NUMERIC_RANGES), "a numeric field without a line in config.NUMERIC_RANGES"
    for name, (kind, optional) in found.items():
        assert (NUMERIC_RANGES[name].kind, NUMERIC_RANGES[name].optional) == (kind, optional), name


def bad_values(name: str) -> list:
    """Values no numeric field accepts, plus the ones just outside this field's own bounds."""
    rule = NUMERIC_RANGES[name]
    bad: list = [True, False, "1", float("nan"), float("inf"), -float("inf")]
    if not rule.optional:
        bad.append(None)
    if rule.kind is int:
        bad.append(1.5)
    if rule.lo is not None:
        bad.append(rule.lo if rule.lo_open else (rule.lo - 1 if rule.kind is int else rule.lo - 1e-9))
    if rule.hi is not None:
        bad.append(rule.hi if rule.hi_open else rule.hi + 1)
    return bad


@pytest.mark.parametrize("name", sorted(numeric_fields()))
def test_every_numeric_field_rejects_bad_values(name: str) -> None:
    assert name in NUMERIC_RANGES, f"{name} has no line in config.NUMERIC_RANGES"
    for value in bad_values(name):
        with pytest.raises(ValueError, match=f"^{name}="):
            RunConfig(**{name: value})
    default = getattr(RunConfig(), name)
    NUMERIC_RANGES[name].check(name, default)  # every default is allowed


@pytest.mark.parametrize("kwargs,message", [
    (dict(clip=-1.0), "clip=-1.0; allowed: > 0"),
    (dict(lr=-1.0), "lr=-1.0; allowed: > 0"),
    (dict(warmup_steps=-5), "warmup_steps=-5; allowed: an integer >= 0"),
    (dict(dropout=-0.1), "dropout=-0.1; allowed: >= 0 and < 1"),
    (dict(seed=2**32), "seed=4294967296; allowed: an integer >= 0 and < 4294967296"),
    (dict(max_steps=0), "max_steps=0; allowed: an integer >= 1, or None"),
    (dict(weight_decay=math.nan), "weight_decay=nan; allowed: >= 0"),
])  # fmt: skip
def test_numeric_messages_name_the_value_and_the_range(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        RunConfig(**kwargs)
    assert str(err.value) == message


def test_cli_clip_minus_one_is_one_line(capsys: pytest.CaptureFixture) -> None:
    from moe_lens.cli import main

    assert main(["train", "--clip", "-1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "moe-lens train: error: clip=-1.0; allowed: > 0"


@pytest.mark.parametrize("bad", ["embeddings", "data", "model"])
def test_a_failed_start_leaves_no_run_directory(real_data_dir: Path, tmp_path: Path, bad: str) -> None:
    from moe_lens.errors import MoeLensError
    from moe_lens.train import train

    kw = dict(dataset="conll2003", data_dir=str(real_data_dir), runs_dir=str(tmp_path / "runs"), run_name="x",
              pos_tags=False, d_embed=16, d_model=16, expert_hidden=16, max_steps=1)  # fmt: skip
    kw.update({"embeddings": dict(embeddings=str(tmp_path / "missing-glove.txt")),
               "data": dict(data_dir=str(tmp_path / "no-data")),
               "model": dict(dataset="wikitext2", vocab_size=100, tie_weights=True, d_model=8)}[bad])  # fmt: skip
    with pytest.raises((MoeLensError, ValueError, FileNotFoundError)):
        train(RunConfig(**kw), progress=False)
    assert not (tmp_path / "runs" / "x").exists()
