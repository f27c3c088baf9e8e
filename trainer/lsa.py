"""Bag-of-words vectors of item texts (LSA): the vectors of the `trail_bow` control (trainer.bow) and of the
range head's bow control (trainer.controls).

    v = TF-IDF of item_text(title, category, description)   words of 2+ letters/digits, lower-cased, in at least
        2 items; idf = ln((1 + n) / (1 + df)) + 1; each row L2-normalised (scikit-learn's TfidfVectorizer defaults
        with min_df=2)
    z = the first k principal axes of v (truncated SVD, LSA: U_k S_k), k = min(H, rank), zero-padded to H
"""

from __future__ import annotations

import re

import numpy as np
import scipy.linalg
import scipy.sparse as sp

_WORD = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token pattern
MIN_DF = 2  # a word of one item only says which item it is, not what it is like


def bow_vectors(texts: list[str], dim: int, min_df: int = MIN_DF) -> np.ndarray:
    """(N, dim) float32 LSA vectors of `texts`: TF-IDF, then its top principal axes (U_k S_k), zero-padded."""
    docs = [_WORD.findall(t.lower()) for t in texts]
    df: dict[str, int] = {}
    for words in docs:
        for w in set(words):
            df[w] = df.get(w, 0) + 1
    vocab = {w: i for i, w in enumerate(sorted(w for w, c in df.items() if c >= min_df))}
    out = np.zeros((len(texts), dim), np.float32)
    if not vocab or not texts:
        return out
    rows, cols = [], []
    for r, words in enumerate(docs):
        for w in words:
            if w in vocab:
                rows.append(r)
                cols.append(vocab[w])
    tf = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(texts), len(vocab)))
    tf.sum_duplicates()
    n = len(texts)
    idf = np.log((1.0 + n) / (1.0 + np.array([df[w] for w in vocab], np.float64))) + 1.0
    v = (tf @ sp.diags(idf)).toarray()
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    v = np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)
    # U_k S_k from the top of the eigen-decomposition of the smaller Gram matrix (exact, no iterative solver)
    small = v.shape[1] <= v.shape[0]
    gram = v.T @ v if small else v @ v.T
    k = min(dim, len(gram))
    vals, vecs = scipy.linalg.eigh(gram, subset_by_index=[len(gram) - k, len(gram) - 1])
    vals, vecs = vals[::-1], vecs[:, ::-1]  # largest first
    z = v @ vecs if small else vecs * np.sqrt(np.clip(vals, 0.0, None))
    keep = vals > 1e-9 * max(1.0, float(vals[0]))  # the rank: axes beyond it are numerical noise
    out[:, : int(keep.sum())] = z[:, keep]
    return out
