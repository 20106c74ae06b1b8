"""Plain transcriptions of the paper's formulas, written independently of the package.

Slerp uses the textbook closed form in float64; losses build logits and targets
explicitly. Used only by the tests.
"""

import math

import torch
import torch.nn.functional as F


def slerp(a, b, lam):
    """Closed-form slerp, lam = 1 gives a (fails at theta = 0 or pi, as the textbook form does)."""
    a, b = a.double(), b.double()
    theta = torch.acos((a * b).sum(1, keepdim=True).clamp(-1, 1))
    same = theta < 1e-12  # a sample paired with itself: the arc is a point
    theta = torch.where(same, torch.ones_like(theta), theta)
    out = (torch.sin(lam * theta) * a + torch.sin((1 - lam) * theta) * b) / torch.sin(theta)
    return torch.where(same, a, out)


def soft_ce(logits, targets):
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


def clip_terms(xr, yr, xc, yc, offset, scale):
    n_rows, n_cols = xr.shape[0], xc.shape[0]
    targets = torch.zeros(n_rows, n_cols, dtype=xr.dtype)
    for i in range(n_rows):
        targets[i, offset + i] = 1.0
    return (soft_ce(scale * xr @ yc.T, targets) + soft_ce(scale * yr @ xc.T, targets)) / 2


def m2mix_term(xr, yr, xc, yc, offset, lam, temperature):
    """m²-Mix: diagonal <x_i, y_i>, off-diagonal <x_i, m_j> (and <y_i, m_j>), / temperature."""
    mixed = slerp(xc, yc, lam).to(xr.dtype)
    n_rows, n_cols = xr.shape[0], xc.shape[0]
    img = torch.zeros(n_rows, n_cols, dtype=xr.dtype)
    txt = torch.zeros(n_rows, n_cols, dtype=xr.dtype)
    targets = torch.zeros(n_rows, n_cols, dtype=xr.dtype)
    img_cols, txt_cols = [], []
    for i in range(n_rows):
        row_i, row_t = [], []
        for j in range(n_cols):
            if j == offset + i:
                row_i.append((xr[i] * yr[i]).sum())
                row_t.append((yr[i] * xr[i]).sum())
            else:
                row_i.append((xr[i] * mixed[j]).sum())
                row_t.append((yr[i] * mixed[j]).sum())
        img_cols.append(torch.stack(row_i))
        txt_cols.append(torch.stack(row_t))
        targets[i, offset + i] = 1.0
    img, txt = torch.stack(img_cols), torch.stack(txt_cols)
    return (soft_ce(img / temperature, targets) + soft_ce(txt / temperature, targets)) / 2


def unimix_term(kind, xr, yr, xc, yc, offset, lam, pair, scale):
    """V-Mix / L-Mix / VL-Mix with partner pair[j] of global sample j, for any permutation.

    Every (possibly mixed) item is written as what it holds: the mix of sample j holds j with
    weight lam and pair[j] with 1 - lam; a plain item j holds j. The soft target of an anchor
    against a column is the weight that the mixed one of the two gives to the plain one's
    sample. VL-Mix (both sides mixed) follows the reference: the anchor's own index and its
    partner's are both positives, each with weight 1 (well-defined for an involution only).
    """
    n_rows, n_cols = xr.shape[0], xc.shape[0]
    rows = torch.arange(offset, offset + n_rows)
    mix_img = kind in ("vmix", "vlmix")
    mix_txt = kind in ("lmix", "vlmix")
    x_cols = slerp(xc, xc[pair], lam).to(xc.dtype) if mix_img else xc
    y_cols = slerp(yc, yc[pair], lam).to(yc.dtype) if mix_txt else yc
    x_rows = slerp(xr, xc[pair[rows]], lam).to(xr.dtype) if mix_img else xr
    y_rows = slerp(yr, yc[pair[rows]], lam).to(yr.dtype) if mix_txt else yr

    def holds(mixed_index, sample):
        """Weight of plain sample `sample` in the mix made from `mixed_index`."""
        w = 0.0
        if sample == mixed_index:
            w += lam
        if sample == int(pair[mixed_index]):
            w += 1 - lam
        return w

    t_img = torch.zeros(n_rows, n_cols, dtype=xr.dtype)  # image anchors against captions
    t_txt = torch.zeros(n_rows, n_cols, dtype=xr.dtype)  # caption anchors against images
    for a in range(n_rows):
        g = offset + a
        for b in range(n_cols):
            if kind == "vlmix":
                t_img[a, b] = float(b == g) + float(b == int(pair[g]))
                t_txt[a, b] = float(b == g) + float(b == int(pair[g]))
            elif kind == "vmix":  # mixed image g vs plain caption b; plain caption g vs mixed image b
                t_img[a, b] = holds(g, b)
                t_txt[a, b] = holds(b, g)
            else:  # lmix: plain image g vs mixed caption b; mixed caption g vs plain image b
                t_img[a, b] = holds(b, g)
                t_txt[a, b] = holds(g, b)
    li = scale * x_rows @ y_cols.T
    lt = scale * y_rows @ x_cols.T
    return (soft_ce(li, t_img) + soft_ce(lt, t_txt)) / 2


def uniformity_bruteforce(u, t=2.0):
    return torch.pdist(u.double(), p=2).pow(2).mul(-t).exp().mean().log().item()


def relative_alignment_bruteforce(x, y):
    x, y = x.double(), y.double()
    diff = (y[:, None, :] - x[None, :, :]).norm(dim=2).pow(2)  # (N, N): ||y_i - x_j||^2
    pos = diff.diagonal().clone()
    diff.fill_diagonal_(math.inf)
    return (pos - diff.min(dim=1).values).mean().item()
