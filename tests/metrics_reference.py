"""Independent float64 two-pass numpy reference for the metric tests.

Written from design/METRICS.md with plain loops over classes; it does not import pnc. Inputs are
converted to float64 first, then every statistic is computed from centred data (two passes).
"""
from __future__ import annotations

import numpy as np


def f64(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def ints(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a).astype(np.int64).reshape(-1)


def class_stats(X, y, K):
    """(present class ids, counts, means (Kp, D), variances (Kp,)) with var = mean squared distance."""
    X, y = f64(X), ints(y)
    present = [k for k in range(K) if np.any(y == k)]
    n = np.array([np.sum(y == k) for k in present], dtype=np.float64)
    mu = np.stack([X[y == k].mean(0) for k in present])
    var = np.array([np.mean(np.sum((X[y == k] - X[y == k].mean(0)) ** 2, axis=1)) for k in present])
    return present, n, mu, var


def cdnv(X, y, K) -> float:
    _, _, mu, var = class_stats(X, y, K)
    vals = []
    for i in range(len(mu)):
        for j in range(i + 1, len(mu)):
            vals.append((var[i] + var[j]) / (2.0 * np.sum((mu[i] - mu[j]) ** 2)))
    return float(np.mean(vals))


def within_scatter(X, y, K) -> np.ndarray:
    X, y = f64(X), ints(y)
    S = np.zeros((X.shape[1], X.shape[1]))
    for k in range(K):
        if np.any(y == k):
            Z = X[y == k] - X[y == k].mean(0)
            S += Z.T @ Z
    return S


def nc1(X, y, K) -> float:
    X, y = f64(X), ints(y)
    present, n, mu, _ = class_stats(X, y, K)
    kp, N, D = len(present), len(y), X.shape[1]
    sw = within_scatter(X, y, K) / N
    mc = mu - X.mean(0)
    sb = mc.T @ mc / kp
    w, V = np.linalg.eigh(sb)
    order = np.argsort(w)[::-1][: kp - 1]
    w, V = w[order], V[:, order]
    keep = w > max(kp, D) * np.finfo(np.float64).eps * w[0]
    pinv = V[:, keep] @ np.diag(1.0 / w[keep]) @ V[:, keep].T
    return float(np.trace(sw @ pinv) / kp)


def nc2(X, y, K) -> float:
    X, y = f64(X), ints(y)
    present, _, mu, _ = class_stats(X, y, K)
    kp = len(present)
    mc = mu - X.mean(0)
    G = mc @ mc.T
    etf = (np.eye(kp) - np.ones((kp, kp)) / kp) / np.sqrt(kp - 1)
    return float(np.linalg.norm(G / np.linalg.norm(G) - etf))


def ncc_predict(Xref, yref, K, X) -> np.ndarray:
    present, _, mu, _ = class_stats(Xref, yref, K)
    X = f64(X)
    d = ((X[:, None, :] - mu[None, :, :]) ** 2).sum(-1)
    return np.array(present)[d.argmin(1)]


def ncc_accuracy(Xref, yref, K, X, y) -> float:
    return float(np.mean(ncc_predict(Xref, yref, K, X) == ints(y)))


def ridge_fit(X, y, K, alpha):
    """Ridge with unpenalised intercept, lambda = alpha * n * tr(cov)/D, by lstsq on the augmented
    system [Xc; sqrt(lambda) I] W = [Yc; 0]. Returns (W (D, K), b (K,))."""
    X, y = f64(X), ints(y)
    n, D = X.shape
    Y = np.eye(K)[y]
    xbar, ybar = X.mean(0), Y.mean(0)
    Xc, Yc = X - xbar, Y - ybar
    s = np.trace(Xc.T @ Xc / n) / D
    s = s if s > 0 else 1.0
    lam = alpha * s * n
    A = np.vstack([Xc, np.sqrt(lam) * np.eye(D)])
    B = np.vstack([Yc, np.zeros((D, K))])
    W = np.linalg.lstsq(A, B, rcond=None)[0]
    return W, ybar - W.T @ xbar


def ridge_select(Xf, yf, Xv, yv, K, alphas):
    """Validation MSE per alpha from explicit predictions; chosen = argmin, ties to the larger alpha."""
    Yv = np.eye(K)[ints(yv)]
    mses = []
    for a in alphas:
        W, b = ridge_fit(Xf, yf, K, a)
        mses.append(float(np.mean(np.sum((Yv - f64(Xv) @ W - b) ** 2, axis=1))))
    best = min(mses)
    chosen = max(i for i, m in enumerate(mses) if m <= best * (1 + 1e-9))
    return chosen, mses


def naive_float32_variances(X, y, K) -> np.ndarray:
    """The pitfall: var = E||h||^2 - ||E h||^2 accumulated in float32 (for showing data is adversarial)."""
    X = np.asarray(X, dtype=np.float32)
    y = ints(y)
    out = []
    for k in range(K):
        Z = X[y == k]
        if len(Z):
            m = Z.sum(0, dtype=np.float32) / np.float32(len(Z))
            e2 = (Z * Z).sum(1, dtype=np.float32).sum(dtype=np.float32) / np.float32(len(Z))
            out.append(float(e2 - (m * m).sum(dtype=np.float32)))
    return np.array(out)


def simplex_etf(K: int, D: int, rng: np.random.Generator) -> np.ndarray:
    """(K, D) class means forming a simplex ETF (rotated into D >= K dims)."""
    M = np.sqrt(K / (K - 1)) * (np.eye(K) - np.ones((K, K)) / K)
    U, _ = np.linalg.qr(rng.standard_normal((D, K)))
    return M @ U.T


def collapsed_data(rng, K=5, D=16, n_per=(80, 120), offset=1e2, rel_var=1e-8, dtype=np.float32):
    """Strongly collapsed float32 features: centred class means of norm 1, a common offset of norm
    ``offset``, within-class variance rel_var * ||mu_k||^2 (mu_k including the offset)."""
    means = rng.standard_normal((K, D))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    off = rng.standard_normal(D)
    off *= offset / np.linalg.norm(off) if offset > 0 else 0.0
    mu = means + off
    counts = rng.integers(n_per[0], n_per[1], size=K)
    y = np.repeat(np.arange(K), counts)
    rng.shuffle(y)
    var = rel_var * np.sum(mu ** 2, axis=1)
    X = mu[y] + rng.standard_normal((len(y), D)) * np.sqrt(var[y] / D)[:, None]
    return X.astype(dtype), y
