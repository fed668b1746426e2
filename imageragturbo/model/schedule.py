"""Diffusion arithmetic in variance-preserving form: z_t = a_t z0 + s_t eps, a_t^2 = alphabar_t.

Only the scheduler's ``alphas_cumprod`` and ``prediction_type`` are used, so the same code
serves Euler, DDPM, DDIM and LCM configs (SD-Turbo's Euler ``scale_model_input`` is exactly
this form: its model input at sigma is z / sqrt(sigma^2 + 1) = a_t z0 + s_t eps).
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class NoiseSchedule:
    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}; expected {PREDICTION_TYPES}")
        self.alphas_cumprod = alphas_cumprod.double().cpu()
        self.prediction_type = prediction_type
        self.num_train_timesteps = int(alphas_cumprod.shape[0])

    @classmethod
    def from_scheduler(cls, scheduler) -> NoiseSchedule:
        return cls(scheduler.alphas_cumprod, scheduler.config.prediction_type)

    def alpha_sigma(self, t: torch.Tensor | int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a_t and s_t for t int64 [B] (or one int), shaped to broadcast against ``like`` [B, ...]."""
        abar = self.alphas_cumprod[torch.as_tensor(t, dtype=torch.int64).cpu()]
        shape = (-1,) + (1,) * (like.dim() - 1) if abar.dim() else ()
        alpha = abar.sqrt().to(like.device, like.dtype).reshape(shape)
        sigma = (1 - abar).sqrt().to(like.device, like.dtype).reshape(shape)
        return alpha, sigma

    def predict_x0(self, model_output: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t, z_t)
        if self.prediction_type == "epsilon":
            return (z_t - sigma * model_output) / alpha
        if self.prediction_type == "v_prediction":
            return alpha * z_t - sigma * model_output
        return model_output

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t, z0)
        return alpha * z0 + sigma * noise
