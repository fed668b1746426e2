"""Training-free H-space injection (paper eq. 3): slerp between retrieved and target features."""

from __future__ import annotations

import torch

# Below this angle the two directions are parallel for float32 and slerp's sin(omega) division
# is unstable; linear interpolation is then exact to the same precision.
_MIN_ANGLE = 1e-4


def slerp_inject(h_tgt: torch.Tensor, h_retr: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
    """Blend the top-1 retrieved H-feature into the target one, per sample.

    h_tgt and h_retr: float [B, C, h, w] (same shape; pass the top-1 neighbour). w: the blend
    weight in (0, 1], a float or float [B]; w is the weight of the *target* (eq. 3:
    ``sin((1-w) omega)/sin(omega) * h_retr + sin(w omega)/sin(omega) * h_tgt``). The
    interpolation runs on the flattened, unit-normalised features, and the result is rescaled to
    the target's norm, so the decoder sees features of the magnitude it was trained on.
    w = 1 returns ``h_tgt`` exactly.
    """
    if h_tgt.shape != h_retr.shape:
        raise ValueError(f"h_retr {tuple(h_retr.shape)} must match h_tgt {tuple(h_tgt.shape)} for injection")
    b = h_tgt.shape[0]
    w_t = torch.as_tensor(w, dtype=torch.float32, device=h_tgt.device).reshape(-1).expand(b)
    if bool(((w_t <= 0) | (w_t > 1)).any()):
        raise ValueError(f"inject w must be in (0, 1], got {w_t.tolist()}")
    return slerp_blend(h_tgt, h_retr, w_t)


def slerp_blend(h_tgt: torch.Tensor, h_retr: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """:func:`slerp_inject` without its checks, w_t float32 [B]: the traceable core that the
    exported ``denoise_inject`` graph runs (a data-dependent check cannot live in an ONNX graph,
    so callers validate w first)."""
    b = h_tgt.shape[0]
    tgt = h_tgt.reshape(b, -1).float()
    retr = h_retr.reshape(b, -1).float().to(tgt.device)
    norm_tgt = tgt.norm(dim=1, keepdim=True)
    tgt_n = tgt / norm_tgt.clamp_min(1e-12)
    retr_n = retr / retr.norm(dim=1, keepdim=True).clamp_min(1e-12)
    omega = torch.arccos((tgt_n * retr_n).sum(dim=1).clamp(-1.0, 1.0))[:, None]
    wc = w_t[:, None]
    sin_omega = torch.sin(omega)
    parallel = omega < _MIN_ANGLE
    safe_sin = torch.where(parallel, torch.ones_like(sin_omega), sin_omega)
    coef_retr = torch.where(parallel, 1 - wc, torch.sin((1 - wc) * omega) / safe_sin)
    coef_tgt = torch.where(parallel, wc, torch.sin(wc * omega) / safe_sin)
    blended = (coef_retr * retr_n + coef_tgt * tgt_n) * norm_tgt
    blended = blended.reshape(h_tgt.shape).to(h_tgt.dtype)
    keep = (w_t == 1).view(b, *([1] * (h_tgt.dim() - 1)))
    return torch.where(keep, h_tgt, blended)
