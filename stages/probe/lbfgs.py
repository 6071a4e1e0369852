"""Batched L-BFGS: many independent smooth problems minimised at once, each with its own state.

`minimize` runs limited-memory BFGS (Nocedal & Wright, *Numerical Optimization*, 2nd ed., Algorithm 7.4
(two-loop recursion) and 7.5) on M members x of P parameters each, stacked as (M, P). Every member has
its own history of (s, y) pairs, its own initial Hessian scale gamma = s'y / y'y (eq. 7.20), its own
step length from a backtracking Armijo line search (Algorithm 3.1, c1 = 1e-4, halving) and its own
stopping test; the arithmetic of all members is vectorised (einsum over the member axis), and a member
that has converged is frozen: it is no longer evaluated. Pairs that break the curvature condition
s'y > 0 are not stored (N&W section 6.1), so each member's inverse-Hessian approximation stays positive
definite. All members share the ring-buffer position of their history, which keeps the recursion one
batched loop; a skipped pair is a zero entry (rho = 0) and contributes nothing.

`objective(index, x)` returns the values (m,) and gradients (m, P) of the members `index` (m,) at
`x` (m, P); batching the members' arithmetic into a few large matmuls is its job
(`stages.probe.banks.LogisticObjective`).

A member stops when max |gradient| <= `tol` (scipy's L-BFGS-B `pgtol`, which scikit-learn's
LogisticRegression sets to its `tol`), when the relative decrease of its value in one step is at most
`ftol` (scipy's factr test), when its line search fails, or after `max_iter` iterations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

ARMIJO = 1e-4  # c1 of the sufficient-decrease condition (N&W's suggested value)
MAX_BACKTRACKS = 40


@dataclass
class Result:
    """x (M, P) at the end; per member: iterations, converged (bool: gradient or value test met), value."""

    x: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    value: torch.Tensor
    gradient: torch.Tensor  # per member max |gradient| at x
    evaluations: int  # objective calls (each one batched evaluation of the members it was given)
    state: dict  # the members' histories, to continue from (`minimize(..., state=)`), e.g. in another precision


def minimize(
    objective: Objective,
    x0: torch.Tensor,
    *,
    tol: float = 1e-6,
    ftol: float = 1e-12,
    max_iter: int = 500,
    history: int = 10,
    state: dict | None = None,
    precondition: torch.Tensor | None = None,
) -> Result:
    """Minimise M independent functions from x0 (M, P); see the module docstring. `state` (a previous
    Result's, at x0) continues with the members' curvature histories instead of a gradient step.
    `precondition` (M, P), positive: a diagonal initial inverse Hessian per member, H0 = gamma diag(D) with
    gamma = s'y / y'Dy (eq. 7.20 in the metric of D), and the first step -D g."""
    x = x0.clone()
    M, P = x.shape
    device, dtype = x.device, x.dtype
    every = torch.arange(M, device=device)
    f, g = objective(every, x)
    if state is not None:
        S, Y, rho, gamma = (state[k].to(dtype) for k in ("S", "Y", "rho", "gamma"))
        fresh, offset, history = state["fresh"].clone(), state["offset"], S.shape[1]
    else:
        S = torch.zeros(M, history, P, device=device, dtype=dtype)
        Y = torch.zeros_like(S)
        rho = torch.zeros(M, history, device=device, dtype=dtype)  # 1 / s'y, 0 for an empty or skipped slot
        gamma = torch.ones(M, device=device, dtype=dtype)
        fresh = torch.ones(M, dtype=torch.bool, device=device)  # no pair stored yet: a scaled gradient step
        offset = 0
    iterations = torch.zeros(M, dtype=torch.long, device=device)
    converged = g.abs().amax(1) <= tol
    stopped = converged.clone()
    evaluations = 1
    for step in range(offset, offset + max_iter):
        active = (~stopped).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        ga, xa, fa = g[active], x[active], f[active]
        Da = None if precondition is None else precondition[active]
        d = -_two_loop(ga, S[active], Y[active], rho[active], gamma[active], (step - 1) % history, history, Da)
        # no curvature information yet: a steepest-descent step of length 1 / ||g|| at most (as torch's LBFGS)
        first = fresh[active]
        if first.any():
            if Da is None:
                scale = torch.clamp(1.0 / ga.abs().sum(1, keepdim=True), max=1.0)
                d = torch.where(first[:, None], -ga * scale, d)
            else:
                d = torch.where(first[:, None], -ga * Da, d)
        slope = (ga * d).sum(1)
        uphill = slope >= 0  # rounding can spoil the direction: fall back to steepest descent
        if uphill.any():
            d = torch.where(uphill[:, None], -ga, d)
            slope = torch.where(uphill, -(ga * ga).sum(1), slope)
        t = torch.ones(len(active), device=device, dtype=dtype)
        x_new, f_new, g_new = xa + d, torch.empty_like(fa), torch.empty_like(ga)
        pending = torch.arange(len(active), device=device)  # positions (in `active`) still searching
        failed = torch.zeros(len(active), dtype=torch.bool, device=device)
        for _ in range(MAX_BACKTRACKS):
            trial = xa[pending] + t[pending, None] * d[pending]
            f_try, g_try = objective(active[pending], trial)
            evaluations += 1
            ok = f_try <= fa[pending] + ARMIJO * t[pending] * slope[pending]
            done = pending[ok]
            x_new[done], f_new[done], g_new[done] = trial[ok], f_try[ok], g_try[ok]
            pending = pending[~ok]
            if pending.numel() == 0:
                break
            t[pending] *= 0.5
        else:
            failed[pending] = True  # no decrease representable along d: the member is as good as it gets
            x_new[pending], f_new[pending], g_new[pending] = xa[pending], fa[pending], ga[pending]
        s, y = x_new - xa, g_new - ga
        sy = (s * y).sum(1)
        good = sy > 1e-10 * (y * y).sum(1)
        slot = step % history
        S[active, slot] = torch.where(good[:, None], s, 0.0)
        Y[active, slot] = torch.where(good[:, None], y, 0.0)
        rho[active, slot] = torch.where(good, 1.0 / torch.where(good, sy, 1.0), 0.0)
        yy = (y * y).sum(1) if Da is None else (y * y * Da).sum(1)
        gamma[active] = torch.where(good, sy / torch.where(good, yy, 1.0), gamma[active])
        fresh[active] = fresh[active] & ~good
        x[active], f[active], g[active] = x_new, f_new, g_new
        iterations[active] += 1
        small = (fa - f_new) <= ftol * torch.clamp(torch.maximum(fa.abs(), f_new.abs()), min=1.0)
        met = (g_new.abs().amax(1) <= tol) | (small & ~failed)
        converged[active] = met
        stopped[active] = met | failed
    state = {"S": S, "Y": Y, "rho": rho, "gamma": gamma, "fresh": fresh, "offset": step + 1 if max_iter else offset}
    return Result(x, iterations, converged, f, g.abs().amax(1), evaluations, state)


def _two_loop(
    g: torch.Tensor,
    S: torch.Tensor,
    Y: torch.Tensor,
    rho: torch.Tensor,
    gamma: torch.Tensor,
    newest: int,
    history: int,
    diagonal: torch.Tensor | None = None,
) -> torch.Tensor:
    """H g for each member (N&W Algorithm 7.4): g (m, P), S and Y (m, h, P), rho (m, h), gamma (m,);
    the newest pair sits at slot `newest`, older ones before it (cyclically)."""
    q = g.clone()
    alphas = [None] * history
    order = [(newest - i) % history for i in range(history)]  # newest to oldest
    for i in order:
        alphas[i] = rho[:, i] * (S[:, i] * q).sum(1)
        q -= alphas[i][:, None] * Y[:, i]
    r = gamma[:, None] * q if diagonal is None else gamma[:, None] * diagonal * q
    for i in reversed(order):  # oldest to newest
        beta = rho[:, i] * (Y[:, i] * r).sum(1)
        r += (alphas[i] - beta)[:, None] * S[:, i]
    return r
