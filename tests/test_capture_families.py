"""Each supported Hugging Face MoE family as a tiny random config (hidden 64, 2-4 layers, 8 experts, top-2;
Switch is top-1 by design), built from its config class with no download. The recorded routing is checked
against the experts themselves: a hook on every experts module (found by class name, not through the adapters)
logs the expert index and combine weight each token row was handed to the expert computation with, and checks
that the module's output is exactly the sum of those weights times those experts applied one at a time to those
rows (so they are what the experts computed); the recorded experts must be exactly those, the recorded gates equal those weights to 1e-6, and the
recorded `layer` the index of the decoder layer that holds the experts module (dense layers interleaved in
Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 and Switch). Also: Qwen2-MoE's shared-expert gate, Switch's dropped tokens,
DeepSeek-V3's biased group-limited selection, the entropy of the recorded distribution and hook removal."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import transformers  # the [hf] extra, in [all]: CI runs these tests

from moe_lens.capture.adapters import ADAPTERS, sparse_layers
from moe_lens.capture.hooks import routing_hooks
from moe_lens.capture.run import capture_batches
from moe_lens.capture.words import SubwordStream

V = 97  # vocabulary of the tiny models
ATTN = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=V, max_position_embeddings=128)
CONFIGS = {
    "mixtral": dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_local_experts=8,
                    num_experts_per_tok=2, **ATTN),
    "qwen2_moe": dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                      num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1], **ATTN),
    "qwen3_moe": dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=4,
                      num_experts=8, num_experts_per_tok=2, decoder_sparse_step=2, norm_topk_prob=True, **ATTN),
    "olmoe": dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                  **ATTN),
    "deepseek_v3": dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=3,
                        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                        n_shared_experts=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                        v_head_dim=16, num_attention_heads=4, num_key_value_heads=4, vocab_size=V,
                        max_position_embeddings=128),
    "gpt_oss": dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_local_experts=8,
                    num_experts_per_tok=2, sliding_window=16, **ATTN),
    "granitemoe": dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_local_experts=8,
                       num_experts_per_tok=2, **ATTN),
    "switch_transformers": dict(d_model=64, d_ff=64, d_kv=16, num_heads=4, num_layers=4, num_decoder_layers=2,
                                num_experts=8, encoder_sparse_step=2, decoder_sparse_step=2, expert_capacity=3,
                                vocab_size=V),
}
B, W = 3, 16  # windows per batch, tokens per window: n = 48 router rows per layer


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(kind, **CONFIGS[kind])).eval()
    with torch.no_grad():  # decisive routers (the default init leaves logits near zero, some routers start at 0)
        for _, router in sparse_layers(model, ADAPTERS[kind]):
            for name, p in router.named_parameters():
                p.normal_(0, 1.0 if "weight" in name else 0.5)  # weight, GPT-OSS bias, DeepSeek correction bias
    return model


class ListRecorder:
    """Stands in for record.Recorder: keeps the traces it is handed."""

    def __init__(self) -> None:
        self.traces = []

    def add(self, traces, **kw) -> None:
        self.traces.append(traces)


def experts_log(model: torch.nn.Module):
    """Hooks on every module whose class name ends in 'Experts': per call, the (layer, index, weights) it was
    handed, after checking that its output is exactly sum over those (row, expert, weight) of weight * expert(row)
    computed one expert at a time from the module's own parameters (`expert_out`): the logged pairs and weights
    are what the expert computation used, whatever kernel (eager loop, grouped_mm, batched_mm) ran."""
    calls, handles = [], []
    for name, mod in model.named_modules():
        if not type(mod).__name__.endswith("Experts") or "decoder" in name.split("."):
            continue
        layer = int(re.search(r"(?:layers|block)\.(\d+)\.", name + ".").group(1))

        def hook(module, args, kwargs, output, layer=layer):
            x, index, weights = args[0], args[1].detach(), args[2].detach().float()
            e = module.num_experts
            ref = torch.zeros_like(output, dtype=torch.float32)
            for (row, expert), w in used(index, weights, e).items():
                ref[row] += w * expert_out(module, x[row:row + 1], expert)[0].float()
            torch.testing.assert_close(output.float(), ref, atol=1e-5, rtol=1e-4)
            calls.append((layer, index.clone(), weights.clone()))

        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    return calls, handles


def expert_out(mod: torch.nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
    """Expert e of an experts module on x (1, d), written from the families' expert definitions."""
    F = torch.nn.functional
    if hasattr(mod, "gate_up_proj_bias"):  # GPT-OSS: biased, interleaved gate/up, clamped swiglu (its _apply_gate)
        return mod._apply_gate(x @ mod.gate_up_proj[e] + mod.gate_up_proj_bias[e]) @ mod.down_proj[e] + mod.down_proj_bias[e]
    if hasattr(mod, "gate_up_proj"):  # fused SwiGLU experts (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, Granite)
        gate, up = F.linear(x, mod.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(mod.act_fn(gate) * up, mod.down_proj[e])
    return mod[f"expert_{e}"](x)  # Switch: a ModuleDict of dense MLPs


def used(index: torch.Tensor, weights: torch.Tensor, e: int) -> dict[tuple[int, int], float]:
    """{(row, expert): weight} the expert computation was handed. Switch hands (n, 1, e) one-hot masks."""
    if index.dim() == 3:  # Switch: a zero row (over capacity) reaches no expert
        rows, _, experts = torch.nonzero(index, as_tuple=True)
        return {(int(r), int(x)): float(weights[r, 0]) for r, x in zip(rows, experts)}
    rows = torch.arange(index.shape[0])[:, None].expand_as(index)
    keep = index < e  # a padding value e would mean "no expert"
    return {(int(r), int(x)): float(w) for r, x, w in zip(rows[keep], index[keep], weights[keep])}


def recorded(tr, e: int) -> dict[tuple[int, int], float]:
    r = tr.routing
    n, k = r.expert_idx.shape
    rows = torch.arange(n)[:, None].expand(n, k)
    ok = torch.ones(n, k, dtype=torch.bool) if r.dropped is None else ~r.dropped
    return {(int(a), int(x)): float(g) for a, x, g in zip(rows[ok], r.expert_idx[ok], r.gate[ok])}


def run_capture(kind: str, batches: int = 2):
    model = tiny(kind)
    rng = np.random.default_rng(0)
    m = batches * B * W
    stream = SubwordStream(rng.integers(1, V, m), np.arange(m) // 2, (np.arange(m) % 2).astype(np.int16))
    pos = [np.arange(i * B * W, (i + 1) * B * W).reshape(B, W) for i in range(batches)]
    calls, handles = experts_log(model)
    rec = ListRecorder()
    try:
        capture_batches(model, ADAPTERS[kind], stream, pos, None, rec, "wikitext2", "valid", torch.device("cpu"))
    finally:
        for h in handles:
            h.remove()
    return model, rec.traces, calls


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_recorded_routing_is_what_the_experts_computed(kind: str) -> None:
    model, traces, calls = run_capture(kind)
    adapter = ADAPTERS[kind]
    e = adapter.num_experts(model.config)
    expert_layers = sorted({layer for layer, _, _ in calls})
    assert len(calls) == len(traces) * len(expert_layers)  # every experts call belongs to a recorded batch
    for b, batch in enumerate(traces):
        assert [tr.layer for tr in batch] == expert_layers  # real decoder-layer indices, dense layers skipped
        mine = calls[b * len(expert_layers):(b + 1) * len(expert_layers)]
        for tr, (layer, index, weights) in zip(batch, mine):
            assert tr.layer == layer
            n = B * W
            assert tr.routing.expert_idx.shape == (n, adapter.top_k(model.config)) and tr.token_idx.shape == (n,)
            want, got = used(index, weights, e), recorded(tr, e)
            assert want.keys() == got.keys(), f"{kind} layer {layer}: experts differ"
            np.testing.assert_allclose([got[x] for x in want], [want[x] for x in want], atol=1e-6, rtol=0)
            p = tr.routing.router_probs  # (n, e) a distribution; entropy is its own
            assert p.shape == (n, e)
            torch.testing.assert_close(p.sum(-1), torch.ones(n), atol=1e-5, rtol=0)
            torch.testing.assert_close(tr.stats.entropy, -(p * p.log()).sum(-1), atol=1e-5, rtol=0)
            assert torch.equal(tr.extra["word_idx"], tr.token_idx // 2)


def test_interleaved_dense_layers_have_their_real_index() -> None:
    want = {"qwen2_moe": [0, 2, 3], "qwen3_moe": [1, 3], "deepseek_v3": [1, 2], "switch_transformers": [1, 3]}
    for kind, layers in want.items():
        _, traces, _ = run_capture(kind, batches=1)
        assert [tr.layer for tr in traces[0]] == layers, kind


def test_qwen2_shared_expert_gate_is_the_models_sigmoid() -> None:
    model = tiny("qwen2_moe")
    seen = {}
    for i, layer in enumerate(model.layers):
        if type(layer.mlp).__name__ == "Qwen2MoeSparseMoeBlock":
            layer.mlp.shared_expert.register_forward_hook(
                lambda mod, a, out, i=i: seen.__setitem__(i, None))
            layer.mlp.shared_expert_gate.register_forward_hook(
                lambda mod, a, out, i=i: seen.__setitem__(i, torch.sigmoid(out.detach().float()).reshape(-1)))
    rec = ListRecorder()
    m = B * W
    stream = SubwordStream(np.arange(m) % V, np.arange(m), np.zeros(m, dtype=np.int16))
    capture_batches(model, ADAPTERS["qwen2_moe"], stream, [np.arange(m).reshape(B, W)], None, rec, "w", "v",
                    torch.device("cpu"))
    for tr in rec.traces[0]:
        torch.testing.assert_close(tr.extra["shared_gate"], seen[tr.layer], atol=1e-6, rtol=0)


def test_switch_records_dropped_tokens_the_experts_never_saw() -> None:
    _, traces, calls = run_capture("switch_transformers", batches=1)
    for tr, (_, index, _) in zip(traces[0], calls):
        never = index.sum(dim=(1, 2)) == 0  # (n,) rows no expert processed
        assert never.any()  # capacity 3 per sequence of 16 tokens and 8 experts: some overflow
        assert torch.equal(tr.routing.dropped[:, 0], never)


def test_deepseek_selection_is_not_plain_topk_of_scores() -> None:
    """The correction bias and group limit change the choice: recomputing top-k of the sigmoid would be wrong."""
    _, traces, _ = run_capture("deepseek_v3", batches=1)
    differs = 0
    for tr in traces[0]:
        plain = tr.routing.router_probs.topk(2, dim=-1).indices.sort(-1).values
        differs += int((plain != tr.routing.expert_idx.sort(-1).values).any(-1).sum())
    assert differs > 0


def test_hooks_are_removed_even_when_the_forward_fails() -> None:
    model = tiny("mixtral")
    routers = [r for _, r in sparse_layers(model, ADAPTERS["mixtral"])]
    with pytest.raises(RuntimeError, match="boom"), routing_hooks(model, ADAPTERS["mixtral"]):
        assert all(len(r._forward_hooks) == 1 for r in routers)
        raise RuntimeError("boom")
    assert all(len(r._forward_hooks) == 0 for r in routers)


def test_docs_table_lists_every_adapter_with_its_versions() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "capture.md").read_text()
    table = doc[doc.index("## Families"):]
    rows = {line.split("|")[1].strip().strip("`"): line for line in table.splitlines() if line.startswith("| `")}
    assert set(rows) == set(ADAPTERS)
    for kind, adapter in ADAPTERS.items():
        assert rows[kind].rstrip().rstrip("|").strip().endswith(adapter.versions), kind
