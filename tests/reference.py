"""An independent NumPy float64 transcription of Algorithm 1 of Pagliardini et al.
(2024), "The AdEMAMix Optimizer: Better, Faster, Older", arXiv:2409.03137, with
the warm-up schedules of its Eqs. (4) and (5). Written from the paper, not from
the package."""

import math

import numpy as np


def alpha_at(t, alpha, alpha_start=0.0, warmup=0):
    """Eq. (4): linear warm-up of alpha over `warmup` steps."""
    if warmup == 0 or t >= warmup:
        return alpha
    return (1 - t / warmup) * alpha_start + t / warmup * alpha


def beta3_at(t, beta_end, beta_start=0.0, warmup=0):
    """Eq. (5): warm-up linear in f(b) = ln(0.5)/ln(b) - 1."""
    if warmup == 0 or t >= warmup:
        return beta_end

    def f(b):
        return -1.0 if b == 0 else math.log(0.5) / math.log(b) - 1

    x = (1 - t / warmup) * f(beta_start) + t / warmup * f(beta_end)
    return 0.0 if x + 1 <= 0 else 0.5 ** (1 / (x + 1))


def ademamix_run(
    params,
    grads,
    lr=1e-3,
    b1=0.9,
    b2=0.999,
    b3=0.9999,
    alpha=5.0,
    eps=1e-8,
    weight_decay=0.0,
    t_alpha=0,
    t_b3=0,
    lr_fn=None,
):
    """Run Algorithm 1 on a list of gradients (each an array like `params`; a
    callable `grads(theta, t)` also works). Returns the list of parameters after
    each step and the final (m1, m2, nu)."""
    theta = np.asarray(params, np.float64).copy()
    m1 = np.zeros_like(theta)
    m2 = np.zeros_like(theta)
    nu = np.zeros_like(theta)
    history = []
    n = len(grads) if not callable(grads) else None
    t = 0
    while n is None or t < n:
        g = grads(theta, t) if callable(grads) else np.asarray(grads[t], np.float64)
        if g is None:
            break
        step = t + 1
        a = alpha_at(t, alpha, 0.0, t_alpha)
        b3_t = beta3_at(t, b3, b1, t_b3) if t_b3 else b3
        eta = lr_fn(t) if lr_fn is not None else lr
        m1 = b1 * m1 + (1 - b1) * g
        m2 = b3_t * m2 + (1 - b3_t) * g
        nu = b2 * nu + (1 - b2) * g * g
        m1_hat = m1 / (1 - b1**step) if b1 > 0 else g
        nu_hat = nu / (1 - b2**step)
        theta = theta - eta * (
            (m1_hat + a * m2) / (np.sqrt(nu_hat) + eps) + weight_decay * theta
        )
        history.append(theta.copy())
        t += 1
    return history, (m1, m2, nu)
