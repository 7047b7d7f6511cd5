"""The per-group scale searches of llama.cpp's k-quant reference quantizers, vectorized across groups.

Ports of `make_qkx2_quants` (Q2_K, Q4_K, Q5_K), `make_q3_quants` (Q3_K) and `make_qx_quants` (Q6_K) from
ggml-quants.c. Groups come element-major, x [n, G] (n values per group, G groups), so the sums the C code
accumulates one element at a time become n ordered vector additions over all groups: the same fp32 roundings in
the same order, hence the same scales and the same bytes. Data-dependent loops (`break` when nothing changed,
`if (better)`) run their full trip count on every group, with the updates masked per group; a group that stopped
changing stays unchanged, so the result is the same as C's early exit.
"""

from __future__ import annotations

import numpy as np
import torch

from idefix.quant.ggml_bits import GROUP_MAX_EPS, const_div, first_absmax, nearest_int, recip, seq_sum

# Below this magnitude nearest_int is plain round-half-to-even (the fp32 add rounds to an integer; exact to 2^22).
_ROUND_SAFE = float(1 << 21)


def _levels(v: torch.Tensor, lo: int, hi: int, bounded: bool = False) -> torch.Tensor:
    """MAX(lo, MIN(hi, nearest_int(v))) as float32 (the C code multiplies the int levels back as floats).

    `bounded`: the caller knows |v| < _ROUND_SAFE (or masks the groups where it is not), so torch.round gives
    the same integers in one op instead of nearest_int's bit trick.
    """
    if bounded:
        return torch.round(v).clamp_(lo, hi)
    return nearest_int(v).clamp_(lo, hi).float()


def _err(diff: torch.Tensor, use_mad: bool) -> torch.Tensor:
    return diff.abs() if use_mad else diff * diff


def _fit(
    sums: torch.Tensor, sum_w: torch.Tensor, sum_x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weighted least-squares (scale, min) of one candidate; sums [..., 3, G] = (sum_l, sum_l2, sum_xl)."""
    sum_l, sum_l2, sum_xl = sums.unbind(-2)
    D = sum_w * sum_l2 - sum_l * sum_l
    this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
    this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
    clip = this_min > 0  # a positive min is not allowed: refit the scale alone
    this_scale = torch.where(clip, sum_xl / sum_l2, this_scale)
    this_min = torch.where(clip, torch.zeros_like(this_min), this_min)
    return D, this_scale, this_min


def make_qkx2_quants(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric search: x ~ scale * L - the_min with L in 0..nmax, minimizing sum w * err.

    x, w: [n, G]. Returns (scale [G], the_min [G], L [n, G] float32 levels). Each of the nstep + 1 candidate
    scales is derived from the best min found so far (the C loop divides by `max - min` after updating `min`),
    so the steps run one after another, each over all groups.
    """
    xmin = x.amin(0).clamp(max=0)  # `if (min > 0) min = 0`
    xmax = x.amax(0)
    flat = xmax == xmin  # every value equal (after min was raised to 0): all levels 0, scale 0 (masked at the end)
    sum_w, sum_x = seq_sum(torch.stack((w, w * x), dim=1)).unbind(0)
    iscale = const_div(float(nmax), xmax - xmin)
    scale, mn = recip(iscale), xmin
    L = _levels(iscale * (x - xmin), 0, nmax, bounded=True)  # in [0, nmax] unless flat
    best = seq_sum(w * _err(scale * L + xmin - x, use_mad))
    buf = torch.empty(x.shape[0], 3, x.shape[1], dtype=x.dtype, device=x.device)  # per element: w*l, w*l*l, w*l*x
    for step in range(nstep + 1):
        c = np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)  # fp32, C's order
        iscale = const_div(float(c), xmax - mn)
        # |iscale * (x - mn)| <= |iscale| * max(|xmax - mn|, |xmin - mn|): usually ~nmax, but `mn` moves
        reach = iscale.abs() * torch.maximum((xmax - mn).abs(), (xmin - mn).abs())
        laux = _levels(iscale * (x - mn), 0, nmax, bounded=bool(((reach < _ROUND_SAFE) | flat).all()))
        wl = torch.mul(w, laux, out=buf[:, 0])
        torch.mul(wl, laux, out=buf[:, 1])
        torch.mul(wl, x, out=buf[:, 2])
        D, this_scale, this_min = _fit(seq_sum(buf), sum_w, sum_x)
        cur = seq_sum(w * _err(this_scale * laux + this_min - x, use_mad))
        better = (D > 0) & (cur < best)
        L = torch.where(better, laux, L)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    L = torch.where(flat, torch.zeros_like(L), L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    mn = torch.where(flat, xmin, mn)
    return scale, -mn, L


def make_q3_quants(x: torch.Tensor, nmax: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric search with x^2 weights and up to 5 rounds of per-element coordinate descent (do_rmse = true).

    x: [n, G]. Returns (scale [G], L [n, G] float32 levels in 0..2*nmax-1; all 0 for an all-zero group).
    """
    mx = first_absmax(x, 0)
    iscale = const_div(float(-nmax), mx)
    L = _levels(iscale * x, -nmax, nmax - 1, bounded=True)  # |x| <= |max|; all-zero groups are masked below
    w = x * x
    wx = w * x
    sumlx = seq_sum(wx * L)
    suml2 = seq_sum(w * L * L)
    for _ in range(5):
        for i in range(x.shape[0]):
            li = L[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new_l = _levels(x[i] * sl2 / slx, -nmax, nmax - 1)
            slx_new = slx + wx[i] * new_l
            sl2_new = sl2 + w[i] * new_l * new_l
            take = (slx > 0) & (new_l != li) & (sl2_new > 0) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            L[i] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx_new, sumlx)
            suml2 = torch.where(take, sl2_new, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    zero = mx.abs() < GROUP_MAX_EPS
    L = torch.where(zero, torch.zeros_like(L), L + nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), L


def make_qx_quants(x: torch.Tensor, nmax: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric search with x^2 weights over 19 candidate scales (rmse_type = 1, no importance weights).

    x: [n, G]. Returns (scale [G], L [n, G] float32 levels in 0..2*nmax-1; all 0 for an all-zero group).
    Unlike make_qkx2_quants's, the candidates do not depend on each other, so all are evaluated at once
    ([n, S, G]) and only the keep-the-best pass runs candidate by candidate.
    """
    n, g = x.shape
    mx = first_absmax(x, 0)
    w = x * x
    wx = (w * x).unsqueeze(1)
    # candidate 0: iscale = -nmax/max; then -(nmax + 0.1f*is)/max for is = -9..9, is != 0 (fp32, C's order)
    cs = [np.float32(-nmax)] + [-(np.float32(nmax) + np.float32(0.1) * np.float32(i)) for i in range(-9, 10) if i]
    iscale = torch.tensor(np.array(cs, dtype=np.float32), device=x.device).unsqueeze(1).expand(-1, g) / mx  # [S, G]
    lv = _levels(x.unsqueeze(1) * iscale, -nmax, nmax - 1, bounded=True)  # [n, S, G]; |x| <= |max|
    buf = torch.empty(n, len(cs), 2, g, dtype=x.dtype, device=x.device)  # sumlx += w*x[i]*l; suml2 += w*l*l
    torch.mul(wx, lv, out=buf[:, :, 0])
    torch.mul(torch.mul(w.unsqueeze(1), lv, out=buf[:, :, 1]), lv, out=buf[:, :, 1])
    sumlx, suml2 = seq_sum(buf).unbind(1)  # [S, G] each
    scale0 = torch.where(suml2[0] != 0, sumlx[0] / suml2[0], torch.zeros_like(mx))
    scale, best, pick = scale0, scale0 * sumlx[0], torch.zeros(g, dtype=torch.long, device=x.device)
    for s in range(1, len(cs)):
        better = (suml2[s] > 0) & (sumlx[s] * sumlx[s] > best * suml2[s])
        scale = torch.where(better, sumlx[s] / suml2[s], scale)
        best = torch.where(better, scale * sumlx[s], best)
        pick = torch.where(better, s, pick)
    L = lv.gather(1, pick.view(1, 1, g).expand(n, 1, g)).squeeze(1) + nmax
    zero = mx.abs() < GROUP_MAX_EPS
    L = torch.where(zero, torch.zeros_like(L), L)
    return torch.where(zero, torch.zeros_like(scale), scale), L
