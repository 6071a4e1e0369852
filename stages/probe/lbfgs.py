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

`noisy_values`: the objective's gradients are exact to float64 but its values carry rounding far above the
decreases near the optimum (`stages.probe.logistic`'s mixed precision). A step is then also accepted on
Hager and Zhang's approximate Wolfe condition (SIAM J. Optim. 16(1), 2005), which tests the directional
derivative instead of the value: phi'(t) <= (2 c1 - 1) phi'(0), with the value no more than
`NOISE` x |f| above the start; and the relative-decrease test uses the decrease the derivatives imply,
t (phi'(0) + phi'(t)) / 2 (exact for a quadratic), not the noisy difference of values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

ARMIJO = 1e-4  # c1 of the sufficient-decrease condition (N&W's suggested value)
MAX_BACKTRACKS = 40
NOISE = 1e-10  # noisy_values: how far above the start a value accepted on the approximate Wolfe test may lie


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
    noisy_values: bool = False,
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
    evaluations = 1
    # The members still running, compacted: their rows are gathered once and written back when they stop, not
    # gathered from the full (M, ...) arrays every iteration (the histories are 2 x history x P per member).
    active = (~converged).nonzero().squeeze(1)
    work = _Working.gather(active, x, f, g, S, Y, rho, gamma, fresh, precondition)
    step = offset
    for step in range(offset, offset + max_iter):
        if active.numel() == 0:
            break
        xa, fa, ga = work.x, work.f, work.g
        d = -_two_loop(ga, work.S, work.Y, work.rho, work.gamma, (step - 1) % history, history, work.D)
        # no curvature information yet: a steepest-descent step of length 1 / ||g|| at most (as torch's LBFGS)
        first = work.fresh
        if first.any():
            if work.D is None:
                scale = torch.clamp(1.0 / ga.abs().sum(1, keepdim=True), max=1.0)
                d = torch.where(first[:, None], -ga * scale, d)
            else:
                d = torch.where(first[:, None], -ga * work.D, d)
        slope = torch.linalg.vecdot(ga, d)
        uphill = slope >= 0  # rounding can spoil the direction: fall back to steepest descent
        if uphill.any():
            d = torch.where(uphill[:, None], -ga, d)
            slope = torch.where(uphill, -torch.linalg.vecdot(ga, ga), slope)
        x_new, f_new, g_new, t, failed, searches = _line_search(objective, active, xa, fa, ga, d, slope, noisy_values)
        evaluations += searches
        s, y = x_new - xa, g_new - ga
        sy = torch.linalg.vecdot(s, y)
        good = sy > 1e-10 * torch.linalg.vecdot(y, y)
        slot = step % history
        work.S[:, slot] = torch.where(good[:, None], s, 0.0)
        work.Y[:, slot] = torch.where(good[:, None], y, 0.0)
        work.rho[:, slot] = torch.where(good, 1.0 / torch.where(good, sy, 1.0), 0.0)
        yy = torch.linalg.vecdot(y, y) if work.D is None else torch.linalg.vecdot(y * work.D, y)
        work.gamma = torch.where(good, sy / torch.where(good, yy, 1.0), work.gamma)
        work.fresh = work.fresh & ~good
        work.x, work.f, work.g = x_new, f_new, g_new
        iterations[active] += 1
        decrease = -0.5 * t * (slope + torch.linalg.vecdot(g_new, d)) if noisy_values else fa - f_new
        small = decrease <= ftol * torch.clamp(torch.maximum(fa.abs(), f_new.abs()), min=1.0)
        met = (g_new.abs().amax(1) <= tol) | (small & ~failed)
        stop = met | failed
        if stop.any():
            converged[active[stop]] = met[stop]
            work.scatter(stop, active, x, f, g, S, Y, rho, gamma, fresh)
            keep = ~stop
            active = active[keep]
            work = work.select(keep)
    work.scatter(torch.ones(len(active), dtype=torch.bool, device=device), active, x, f, g, S, Y, rho, gamma, fresh)
    state = {"S": S, "Y": Y, "rho": rho, "gamma": gamma, "fresh": fresh, "offset": step + 1 if max_iter else offset}
    return Result(x, iterations, converged, f, g.abs().amax(1), evaluations, state)


@dataclass
class _Working:
    """The running members' rows of the optimizer's arrays (x, f, g, histories, preconditioner)."""

    x: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    S: torch.Tensor
    Y: torch.Tensor
    rho: torch.Tensor
    gamma: torch.Tensor
    fresh: torch.Tensor
    D: torch.Tensor | None

    @classmethod
    def gather(cls, rows, x, f, g, S, Y, rho, gamma, fresh, D) -> _Working:
        return cls(
            x[rows],
            f[rows],
            g[rows],
            S[rows],
            Y[rows],
            rho[rows],
            gamma[rows],
            fresh[rows],
            None if D is None else D[rows],
        )

    def select(self, keep: torch.Tensor) -> _Working:
        return _Working(*(None if v is None else v[keep] for v in vars(self).values()))

    def scatter(self, which, rows, x, f, g, S, Y, rho, gamma, fresh) -> None:
        """Write the members `which` (a mask over the working rows) back to the full arrays at `rows`."""
        if not which.any():
            return
        target = rows[which]
        x[target], f[target], g[target] = self.x[which], self.f[which], self.g[which]
        S[target], Y[target], rho[target] = self.S[which], self.Y[which], self.rho[which]
        gamma[target], fresh[target] = self.gamma[which], self.fresh[which]


def _line_search(objective, active, xa, fa, ga, d, slope, noisy_values):
    """Backtracking from t = 1, halving, to the Armijo condition (or, with `noisy_values`, the approximate Wolfe
    condition), member by member (only the members still searching are evaluated again). Returns the new x,
    f, g, the step lengths, which members failed (no decrease representable along d: they keep their point,
    as good as it gets) and the number of objective calls."""

    def accepted(f_try, g_try, f0, slope0, t):
        if noisy_values:  # the values cannot tell the decrease: the derivatives do, the values guard
            wolfe = torch.linalg.vecdot(g_try, d_now) <= (2 * ARMIJO - 1) * slope0
            return wolfe & (f_try <= f0 + NOISE * f0.abs())
        return f_try <= f0 + ARMIJO * t * slope0

    t = torch.ones_like(fa)
    x_new = xa + d
    f_new, g_new = objective(active, x_new)
    d_now = d
    ok = accepted(f_new, g_new, fa, slope, t)
    if bool(ok.all()):  # the usual case: the unit step is accepted by every member
        return x_new, f_new, g_new, t, torch.zeros_like(ok), 1
    pending = (~ok).nonzero().squeeze(1)  # positions (in `active`) still searching
    failed = torch.zeros_like(ok)
    calls = 1
    for _ in range(MAX_BACKTRACKS - 1):
        t[pending] *= 0.5
        trial = xa[pending] + t[pending, None] * d[pending]
        f_try, g_try = objective(active[pending], trial)
        calls += 1
        d_now = d[pending]
        ok = accepted(f_try, g_try, fa[pending], slope[pending], t[pending])
        done = pending[ok]
        x_new[done], f_new[done], g_new[done] = trial[ok], f_try[ok], g_try[ok]
        pending = pending[~ok]
        if pending.numel() == 0:
            break
    else:
        failed[pending] = True
        x_new[pending], f_new[pending], g_new[pending] = xa[pending], fa[pending], ga[pending]
        t[pending] = 0.0
    return x_new, f_new, g_new, t, failed, calls


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
        alphas[i] = rho[:, i] * torch.linalg.vecdot(S[:, i], q)
        q -= alphas[i][:, None] * Y[:, i]
    r = gamma[:, None] * q if diagonal is None else gamma[:, None] * diagonal * q
    for i in reversed(order):  # oldest to newest
        beta = rho[:, i] * torch.linalg.vecdot(Y[:, i], r)
        r += (alphas[i] - beta)[:, None] * S[:, i]
    return r
