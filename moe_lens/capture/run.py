"""`moe-lens capture`: a pretrained Hugging Face MoE model over a dataset split, its routing recorded.

The run directory has a trained run's layout (docs/traces.md): config.json (model id, revision, dtype,
transformers version, the adapter, the sparse layers), run.json, tokens/ (the dataset's word-level table),
routing/ and, with --record-probs, probs/, all at epoch 0, step 0, written by record.Recorder (host copies
started without a sync, Parquet written by its background thread). Routing rows are per subword: token_idx is
the subword's position in the split's subword stream, word_idx the word's token_idx in tokens, subword its rank
within the word (moe_lens/capture/words.py). The store's `routing` view reads the first subword of each word
with token_idx = word_idx, so every analysis joins tokens unchanged (docs/capture.md).

The subword stream is cut into windows of --context tokens (a BOS token first when the tokenizer has one; it is
routed but not recorded), `--batch-size` windows per forward: no padding ever reaches the routers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from moe_lens.capture.adapters import ADAPTERS, Adapter, sparse_layers
from moe_lens.capture.hooks import routing_hooks
from moe_lens.capture.words import SubwordStream, subword_stream
from moe_lens.clock import now
from moe_lens.errors import MoeLensError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")  # for the error only


@dataclass
class CaptureArgs:
    model: str
    dataset: str = "wikitext2"
    split: str = "valid"
    max_tokens: int | None = None  # subwords recorded (None: the whole split)
    batch_size: int = 8  # windows per forward
    context: int = 512  # tokens per window, BOS included
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    runs_dir: str = "runs"
    run_name: str | None = None
    record_probs: bool = False
    tokenizer: str | None = None  # a local tokenizer directory; None: the model's own
    revision: str | None = None
    data_dir: str | None = None


class Trace(NamedTuple):
    """What Recorder.add reads from a trace (moe_lens.models.MoETrace's fields), plus the captured columns."""

    layer: int
    token_idx: torch.Tensor  # (n,)
    routing: Any
    stats: Any
    extra: dict[str, torch.Tensor]


class _Routing(NamedTuple):
    expert_idx: torch.Tensor  # (n, k)
    gate: torch.Tensor  # (n, k)
    dropped: torch.Tensor | None  # (n, k)
    router_probs: torch.Tensor  # (n, e)


class _Stats(NamedTuple):
    entropy: torch.Tensor  # (n,)


def require_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise MoeLensError("capture needs the transformers package: pip install 'moe-lens[hf]'") from None
    return transformers


def adapter_for(config: Any, model: str) -> Adapter:
    """The family's adapter by config.model_type; one-line errors for a dense model or an unknown family."""
    kind = getattr(config, "model_type", None)
    if kind in ADAPTERS:
        return ADAPTERS[kind]
    experts = [getattr(config, f, None) for f in EXPERT_FIELDS]
    if not any(isinstance(e, int) and e > 1 for e in experts):
        raise MoeLensError(f"MODEL {model} (model_type {kind!r}) is not a mixture-of-experts model")
    raise MoeLensError(f"MODEL {model}: unknown MoE model_type {kind!r}; supported: {', '.join(ADAPTERS)}")


def resolve(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MoeLensError(f"--device {device}: CUDA is not available")
    if dtype not in ("auto", "bf16", "fp32"):
        raise MoeLensError(f"--dtype {dtype}: allowed auto, bf16, fp32")
    dt = torch.bfloat16 if dtype == "bf16" or (dtype == "auto" and dev.type == "cuda") else torch.float32
    return dev, dt


def load_config(args: CaptureArgs) -> Any:
    tf = require_transformers()
    if (args.model.startswith((".", "/", "~")) or args.model.count("/") > 1) and not Path(args.model).expanduser().is_dir():
        raise MoeLensError(f"MODEL {args.model}: no such directory (give a local model directory or a hub id)")
    try:
        config = tf.AutoConfig.from_pretrained(args.model, revision=args.revision)
    except (OSError, ValueError) as e:
        raise MoeLensError(f"MODEL {args.model}: {str(e).splitlines()[0]}") from None
    return config


def load_model(args: CaptureArgs, device: torch.device, dtype: torch.dtype) -> tuple[Any, Adapter]:
    tf = require_transformers()
    adapter = adapter_for(load_config(args), args.model)
    model = tf.AutoModel.from_pretrained(args.model, revision=args.revision, dtype=dtype).to(device).eval()
    check_moe(model, adapter, args.model)
    return model, adapter


def check_moe(model: Any, adapter: Adapter, name: str) -> list[int]:
    layers = [i for i, _ in sparse_layers(model, adapter)]
    if not layers:
        raise MoeLensError(f"MODEL {name} ({adapter.model_type}) has no sparse layer: not a mixture-of-experts model")
    return layers


def load_tokenizer(args: CaptureArgs) -> Any:
    tf = require_transformers()
    where = args.tokenizer or args.model
    local = Path(where).expanduser()
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        hint = "" if args.tokenizer else "; pass --tokenizer DIR (a local tokenizer directory)"
        raise MoeLensError(f"no tokenizer at {where} (none of {', '.join(TOKENIZER_FILES)}){hint}")
    try:
        tok = tf.AutoTokenizer.from_pretrained(where, revision=None if args.tokenizer else args.revision)
    except (OSError, ValueError, TypeError) as e:
        hint = "" if args.tokenizer else "; pass --tokenizer DIR (a local tokenizer directory)"
        raise MoeLensError(f"no tokenizer at {where} ({str(e).splitlines()[0][:120]}){hint}") from None
    if len(tok) < 2:  # transformers 5 builds an empty tokenizer for a repository without tokenizer files
        raise MoeLensError(f"no tokenizer at {where} (an empty vocabulary); pass --tokenizer DIR")
    if not getattr(tok, "is_fast", False):
        raise MoeLensError(f"tokenizer at {where} is not a fast tokenizer (word_ids() are needed); pass --tokenizer DIR")
    return tok


def windows(stream: SubwordStream, context: int, bos: int | None, batch_size: int) -> list[np.ndarray]:
    """Batches of subword positions: each (b, w) array holds stream indices; full windows batched together, the
    short last window alone (no padding)."""
    w = context - (bos is not None)
    m = len(stream.ids)
    full = m // w
    idx = np.arange(full * w).reshape(full, w)  # (full, w)
    out = [idx[i:i + batch_size] for i in range(0, full, batch_size)]
    if m > full * w:
        out.append(np.arange(full * w, m)[None, :])  # (1, m - full*w)
    return out


def capture_batches(model: Any, adapter: Adapter, stream: SubwordStream, batches: list[np.ndarray], bos: int | None,
                    recorder: Any, dataset: str, split: str, device: torch.device) -> int:
    """Forward every batch with the router hooks on; hand each layer's routing to the recorder. Returns tokens."""
    ids_all = torch.from_numpy(stream.ids).to(device)
    word_all = torch.from_numpy(stream.word_idx).to(device)
    sub_all = torch.from_numpy(stream.subword.astype(np.int16)).to(device)
    run = model.get_encoder() if adapter.encoder_only else model
    done = 0
    with routing_hooks(model, adapter) as cap, torch.inference_mode():
        for pos in batches:
            p = torch.from_numpy(pos).to(device)  # (b, w) stream positions
            ids = ids_all[p]
            if bos is not None:
                ids = torch.cat([torch.full_like(ids[:, :1], bos), ids], dim=1)  # (b, 1 + w)
            run(input_ids=ids)
            keep = p.reshape(-1)  # (n,) recorded rows' stream positions
            rows = None
            if bos is not None:  # router rows are (b, 1 + w) flattened: drop each window's BOS row
                b, t = ids.shape
                rows = (torch.arange(b, device=device)[:, None] * t + torch.arange(1, t, device=device)).reshape(-1)
            extra = {"word_idx": word_all[keep], "subword": sub_all[keep]}  # (n,) each, shared by the layers
            traces = [_trace(lr, rows, keep, extra) for lr in cap.take()]
            recorder.add(traces, dataset=dataset, split=split, epoch=0, step=0)
            done += keep.numel()
    return done


def _trace(lr: Any, rows: torch.Tensor | None, keep: torch.Tensor, extra: dict[str, torch.Tensor]) -> Trace:
    r = lr.routed
    pick = (lambda t: t) if rows is None else (lambda t: t[rows])
    probs = pick(r.probs)  # (n, e)
    entropy = torch.special.entr(probs).sum(-1)  # (n,) nats, -sum p ln p with 0 ln 0 = 0
    if lr.shared_gate is not None:
        extra = extra | {"shared_gate": pick(lr.shared_gate)}
    routing = _Routing(pick(r.expert), pick(r.gate), None if r.dropped is None else pick(r.dropped), probs)
    return Trace(lr.layer, keep, routing, _Stats(entropy), extra)


def run_config(args: CaptureArgs, model: Any, adapter: Adapter, layers: list[int], dtype: torch.dtype,
               device: torch.device, run: str) -> dict[str, Any]:
    from moe_lens.rundir import environment

    tf = require_transformers()
    cfg = model.config
    versions = {"transformers": tf.__version__}
    try:
        versions["tokenizers"] = metadata.version("tokenizers")
    except metadata.PackageNotFoundError:
        pass
    env = environment(device)
    env["versions"] |= versions
    return dict(run=run, mode="capture", dataset=args.dataset, split=args.split, model=args.model,
                revision=args.revision or getattr(cfg, "_commit_hash", None), model_type=adapter.model_type,
                router=f"hf:{adapter.model_type}", expert_type="hf", num_experts=adapter.num_experts(cfg),
                top_k=adapter.top_k(cfg), moe_layers=",".join(map(str, layers)), num_layers=len(adapter.layers(model)),
                d_model=getattr(cfg, "hidden_size", getattr(cfg, "d_model", None)), dtype=str(dtype).removeprefix("torch."),
                transformers_version=tf.__version__, tokenizer=args.tokenizer or args.model, context=args.context,
                batch_size=args.batch_size, max_tokens=args.max_tokens, record_probs=args.record_probs,
                num_params=sum(p.numel() for p in model.parameters()), adapter_versions=adapter.versions,
                **env)  # fmt: skip


def capture(args: CaptureArgs, *, model: Any = None, tokenizer: Any = None) -> Path:
    """Record `args.model` over one split; returns the run directory. `model`/`tokenizer`: already loaded
    (tests and the benchmark build tiny models in memory; `args.model` then only names them)."""
    from moe_lens.atomic import write_json_atomic
    from moe_lens.data import load_split
    from moe_lens.rundir import create_run_dir, plan_run_dir

    require_transformers()
    device, dtype = resolve(args.device, args.dtype)
    if args.context < 2:
        raise MoeLensError(f"--context {args.context}: must be at least 2")
    if args.batch_size < 1:
        raise MoeLensError(f"--batch-size {args.batch_size}: must be at least 1")
    run_dir = plan_run_dir(args.runs_dir, args.run_name, args.dataset, "capture", resume=False)  # before any load
    model, adapter, tok = _load(args, device, dtype, model, tokenizer)
    layers = check_moe(model, adapter, args.model)
    split = load_split(args.dataset, args.split, args.data_dir)
    stream = subword_stream(tok, split.tokens["token"].astype(str).tolist(), split.seq_offsets,
                            max_tokens=args.max_tokens)
    vocab = model.get_input_embeddings().num_embeddings
    if len(stream.ids) and int(stream.ids.max()) >= vocab:
        raise MoeLensError(f"tokenizer ids reach {int(stream.ids.max())} but MODEL {args.model} embeds {vocab}: "
                           "the tokenizer does not belong to this model")
    create_run_dir(run_dir, args.runs_dir)
    write_json_atomic(run_config(args, model, adapter, layers, dtype, device, run_dir.name), run_dir / "config.json")
    _record(run_dir, args, model, adapter, stream, split.tokens, getattr(tok, "bos_token_id", None), device)
    return run_dir


def _load(args: CaptureArgs, device: torch.device, dtype: torch.dtype, model: Any, tokenizer: Any) -> tuple:
    """(model, adapter, tokenizer); a dense or unknown model and a missing tokenizer fail before the weights load."""
    if model is None:
        adapter_for(load_config(args), args.model)
        tok = tokenizer if tokenizer is not None else load_tokenizer(args)
        model, adapter = load_model(args, device, dtype)
        return model, adapter, tok
    adapter = adapter_for(model.config, args.model)
    return model.to(device).eval(), adapter, tokenizer if tokenizer is not None else load_tokenizer(args)


def _record(run_dir: Path, args: CaptureArgs, model: Any, adapter: Adapter, stream: SubwordStream, tokens: Any,
            bos: int | None, device: torch.device) -> None:
    """run.json, the tokens table and every batch's routing through the Recorder; run.json says how it ended."""
    from moe_lens.record import Recorder
    from moe_lens.rundir import Metrics, RunState

    state = RunState.start(run_dir, resume=False)
    recorder = Recorder(run_dir, record_probs=args.record_probs)
    tokens = tokens.copy()
    tokens["in_vocab"] = tokens["token"].astype(str) != "<unk>"  # the model reads every word but WikiText's <unk>
    last = int(stream.word_idx[-1]) + 1 if len(stream.word_idx) else 0
    recorder.write_tokens(tokens.iloc[:last], args.dataset, args.split)  # the words up to the last recorded one
    # (not `limit=`: the recorder would apply a word limit to the subword positions of the routing rows)
    start = time.perf_counter()
    status, error, n = "failed", None, 0
    try:
        n = capture_batches(model, adapter, stream, windows(stream, args.context, bos, args.batch_size), bos,
                            recorder, args.dataset, args.split, device)
        recorder.close()
        status = "finished"
    except BaseException as e:
        error = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise
    finally:
        Metrics(run_dir).flush()
        secs = time.perf_counter() - start
        extra = {"tokens": n, "tokens_per_s": n / secs if secs > 0 else None} if status == "finished" else {}
        state.save(status=status, finished_at=now(), error=error, step=0, epoch=0, **extra)
