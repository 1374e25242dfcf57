"""POS probe from routing (Antoine et al. 2024, "Part-of-speech sensitivity of routers in mixture of experts
models"): how much of a token's part of speech its routing decisions carry, against the baselines that say
whether that is more than the word itself carries.

For one epoch per run (default: the last recorded of `split`), probe_routing.sql fetches a bounded sample (the
first `max_tokens` POS-tagged routed tokens): per (token, layer, expert) routed to, the summed gate. Features
per token, for every (MoE layer, expert): 1 if the token was routed to it, and its gate (0 if not): 2 e L
columns. The documents (or sentences, `by`) are shuffled with `seed` and a `test_share` of them held out, so
no document is in both sets. Three predictors, fit on the train documents, scored on the test tokens:

- `probe`           scikit-learn LogisticRegression (lbfgs, multinomial, L2 with C) on the routing features
- `majority_word`   each word's most frequent tag in the train documents (ties: the first tag by name); a word
                    unseen in training gets the majority class
- `majority_class`  the most frequent tag of the train documents for every token

Speed: the fit runs with one BLAS thread (threadpoolctl). Its matrix products are small ((tokens, 2 e L) x
(2 e L, tags)); with OpenBLAS's threads on a busy machine the waiting threads spun: 18-26 s wall (9-10 s CPU)
instead of 0.9-2.2 s for the 20k-token fit at load average 6.6, identical predictions.

Accuracy per predictor with a 95% percentile-bootstrap interval resampling the TEST documents (or sentences)
`n` times (a run whose tokens hold a single unit is left out; draws as `analysis.bootstrap`: `draw_weights` with `default_rng(seed)`, the same draws for the three
predictors, so they are paired).
"""
from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd

from moe_lens.analysis._query import Runs, last_epochs, query, resolve_runs, sql_text
from moe_lens.errors import MoeLensError

METHODS = ("probe", "majority_word", "majority_class")


def probe_features(df: pd.DataFrame, by: str) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """From probe_routing.sql rows: per token (token_idx order) its unit, token_id and pos_tag; the feature
    matrix (tokens, 2 * features) of [routed to (layer, expert)] and its gate; the feature names."""
    if by not in ("document", "sentence"):
        raise MoeLensError(f"by={by!r}; allowed: document, sentence")
    tok = df.drop_duplicates("token_idx").sort_values("token_idx").reset_index(drop=True)
    tok = tok[["token_idx", "unit_doc", "unit_sent", "token_id", "pos_tag"]]
    tok["unit"] = list(zip(tok["unit_doc"], tok["unit_sent"])) if by == "sentence" else tok["unit_doc"]
    cols = df[["layer", "expert"]].drop_duplicates().sort_values(["layer", "expert"])
    names = [f"L{layer}e{e}" for layer, e in cols.itertuples(index=False)]
    col_of = {(int(a), int(b)): i for i, (a, b) in enumerate(cols.itertuples(index=False))}
    row = np.searchsorted(tok["token_idx"].to_numpy(), df["token_idx"].to_numpy())
    col = np.array([col_of[(int(a), int(b))] for a, b in zip(df["layer"], df["expert"])], dtype=np.int64)
    x = np.zeros((len(tok), 2 * len(names)))
    x[row, col] = 1.0
    x[row, len(names) + col] = df["gate"].to_numpy(np.float64)
    return tok, x, [f"routed_{n}" for n in names] + [f"gate_{n}" for n in names]


def split_units(units: np.ndarray, test_share: float, seed: int) -> np.ndarray:
    """(tokens,) bool, True for the tokens of the held-out units: the distinct units (sorted) permuted with
    default_rng(seed), the first round(test_share * U) of them (at least 1, at most U - 1) held out."""
    distinct = pd.unique(pd.Series(units)).tolist()
    distinct.sort()
    if len(distinct) < 2:
        raise MoeLensError(f"the POS probe needs at least 2 documents or sentences to split; found {len(distinct)}")
    perm = np.random.default_rng(seed).permutation(len(distinct))
    m = min(max(1, round(test_share * len(distinct))), len(distinct) - 1)
    test = {distinct[i] for i in perm[:m]}
    return np.array([u in test for u in units])


def baseline_predictions(train_words: np.ndarray, train_tags: np.ndarray, test_words: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(majority_word, majority_class) predictions for the test words, from the train words and tags."""
    counts = pd.DataFrame({"w": train_words, "t": train_tags}).value_counts().rename("n").reset_index()
    majority = counts.groupby("t")["n"].sum().sort_index().idxmax()  # ties: the first tag by name
    best = counts.sort_values(["w", "n", "t"], ascending=[True, False, True]).drop_duplicates("w")
    word_tag = dict(zip(best["w"], best["t"]))
    by_word = np.array([word_tag.get(w, majority) for w in test_words], dtype=object)
    return by_word, np.full(len(test_words), majority, dtype=object)


def pos_probe(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, split: str = "valid", epoch: int | None = None,
              dataset: str | None = None, by: str = "document", max_tokens: int = 20_000, test_share: float = 0.3,
              n: int = 200, seed: int = 0, C: float = 1.0, max_iter: int = 1000) -> pd.DataFrame:
    """Per (run, dataset, split, epoch) and predictor (METHODS): accuracy on the held-out units' tokens, its
    bootstrap interval (accuracy_lo, accuracy_hi), train_tokens, test_tokens, test_units, features, classes."""
    try:
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits  # a dependency of scikit-learn
    except ImportError:
        raise MoeLensError("pos_probe needs scikit-learn: pip install scikit-learn (or moe-lens[dev])") from None

    from moe_lens.analysis.bootstrap import (
        draw_weights,  # bootstrap imports the analysis modules
    )

    if not 0 < test_share < 1:
        raise MoeLensError(f"test_share={test_share}; allowed: 0 < test_share < 1")
    names = resolve_runs(con, runs)
    rows, single = [], []
    for key in last_epochs(con, names, split, epoch, dataset):
        run, ds, ep = key.split("|")
        df = query(con, sql_text("probe_routing"), dict(run=run, dataset=ds, split=split, epoch=int(ep),
                                                        max_tokens=max_tokens))  # fmt: skip
        if df.empty:
            continue
        tok, x, feats = probe_features(df, by)
        if tok["unit"].nunique() < 2:  # one document (the SQuAD sample's valid split): nothing to hold out
            single.append(f"{run}/{ds}")
            continue
        test = split_units(tok["unit"].to_numpy(), test_share, seed)
        y = tok["pos_tag"].to_numpy(dtype=object)
        words = tok["token_id"].to_numpy()
        train_y = y[~test]
        if len(set(train_y)) > 1:
            with threadpool_limits(limits=1, user_api="blas"):  # small products: threads only wait (see below)
                clf = LogisticRegression(C=C, max_iter=max_iter).fit(x[~test], train_y)
                probe = clf.predict(x[test])
        else:  # one tag in training: every predictor says it
            probe = np.full(int(test.sum()), train_y[0], dtype=object)
        by_word, majority = baseline_predictions(words[~test], train_y, words[test])
        units = pd.factorize(pd.Series(list(tok["unit"][test])), sort=True)[0]  # (test tokens,) unit codes
        u = int(units.max()) + 1
        w = draw_weights(np.random.default_rng(seed), u, n)  # (n, U_test), shared by the three predictors
        size = np.bincount(units, minlength=u).astype(np.float64)
        for method, pred in zip(METHODS, (probe, by_word, majority)):
            correct = np.bincount(units, weights=(pred == y[test]).astype(np.float64), minlength=u)
            reps = (w @ correct) / (w @ size)
            lo, hi = np.quantile(reps, [0.025, 0.975])
            rows.append(dict(run=run, dataset=ds, split=split, epoch=int(ep), method=method,
                             accuracy=float(correct.sum() / size.sum()), accuracy_lo=float(lo), accuracy_hi=float(hi),
                             train_tokens=int((~test).sum()), test_tokens=int(test.sum()), test_units=u,
                             features=len(feats), classes=len(set(train_y))))  # fmt: skip
    if not rows:
        why = f"; {', '.join(single)} has one {by} only (try by='sentence')" if single else ""
        raise MoeLensError(f"no POS-tagged routed tokens to split for run(s) {', '.join(names)} in split {split!r} "
                           f"(a run recorded without POS tags, or another split/epoch){why}")  # fmt: skip
    return pd.DataFrame(rows)


__all__ = ["METHODS", "baseline_predictions", "pos_probe", "probe_features", "split_units"]
