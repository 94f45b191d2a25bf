"""Per-sample training losses: DiT's diffusion loss and FlexiDiT's distillation loss.

Both return one loss per sample (N,), so the trainer can group a batch by patch size, log each
size separately and average over the GLOBAL batch (the same math on 1 or W processes).

* `diffusion_loss`: DiT's objective (ADM with `loss_type=MSE`): the MSE between the predicted
  and the true eps, plus, when the model learns its variance (2C output channels), the
  variational bound term for the variance with the eps prediction detached (ADM's "hybrid"
  loss, `L_simple + L_vlb`, unscaled as in DiT).
* `distillation_loss`: `||eps_powerful(x_t) - eps_weak(x_t)||^2` with the teacher's prediction at
  its original patch size as the target; with learned sigma the variance channels are distilled
  too (`distill_sigma=True`, an MSE on the interpolation v in [-1, 1]) or left out.

The noise schedule is `flexikern.diffusion.GaussianDiffusion` (DiT's 1000 linear betas).
"""

from __future__ import annotations

import math

import torch

from flexikern.diffusion import GaussianDiffusion

__all__ = ["diffusion_loss", "distillation_loss", "min_snr_weight", "vlb_term"]


def _gather(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return table.to(like.device)[t].float().view(-1, *[1] * (like.dim() - 1))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data in [-1, 1] quantised to 256 bins (ADM's decoder term)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_plus,
                            torch.where(x > 0.999, log_one_minus_cdf_min,
                                        torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    return log_probs


def vlb_term(diffusion: GaussianDiffusion, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
             eps: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ADM's variational-bound term (bits per dimension), per sample, for the learned variance.

    KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0 and the decoder NLL at t = 0; the
    model's log-variance interpolates between the clipped posterior log-variance and log(beta_t)
    with frac = (v + 1) / 2. Pass `eps` detached so that this term trains only the variance.
    """
    d = diffusion
    coef1, coef2 = _gather(d.posterior_mean_coef1, t, x0), _gather(d.posterior_mean_coef2, t, x0)
    true_mean = coef1 * x0 + coef2 * x_t
    true_logvar = _gather(d.posterior_log_variance_clipped, t, x0)
    min_log, max_log = true_logvar, _gather(torch.log(d.betas), t, x0)
    frac = (v + 1) / 2
    model_logvar = frac * max_log + (1 - frac) * min_log
    pred_x0 = _gather(d.sqrt_recip_alphas_cumprod, t, x0) * x_t - _gather(d.sqrt_recipm1_alphas_cumprod, t, x0) * eps
    model_mean = coef1 * pred_x0 + coef2 * x_t
    kl = _mean_flat(_normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / math.log(2.0)
    nll = -_mean_flat(_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def min_snr_weight(diffusion: GaussianDiffusion, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """(N,) Min-SNR-gamma weights of an eps loss at timesteps `t`: min(SNR_t, gamma) / SNR_t, with
    SNR_t = alpha_bar_t / (1 - alpha_bar_t) (diffusers' `compute_snr` and `--snr_gamma`). The
    nearly clean timesteps (SNR > gamma) are down-weighted; the noisy ones keep weight 1."""
    alpha_bar = diffusion.alphas_cumprod.to(t.device)[t].float()
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=gamma) / snr


def diffusion_loss(model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor, diffusion: GaussianDiffusion, snr_gamma: float | None = None
                   ) -> torch.Tensor:
    """DiT's loss per sample: MSE(eps), Min-SNR-weighted when `snr_gamma` is given (+ the VLB term,
    unweighted, when the output also carries the variance)."""
    c = x0.shape[1]
    eps = model_output[:, :c].float()
    loss = _mean_flat((eps - noise) ** 2)
    if snr_gamma is not None:
        loss = loss * min_snr_weight(diffusion, t, snr_gamma)
    if model_output.shape[1] == 2 * c:
        loss = loss + vlb_term(diffusion, x0, x_t, t, eps.detach(), model_output[:, c:].float())
    return loss


def distillation_loss(student_output: torch.Tensor, teacher_output: torch.Tensor, channels: int,
                      distill_sigma: bool = True) -> torch.Tensor:
    """||eps_teacher - eps_student||^2 per sample (and the variance channels with `distill_sigma`)."""
    k = student_output.shape[1] if distill_sigma else channels
    diff = student_output[:, :k].float() - teacher_output[:, :k].float()
    return _mean_flat(diff ** 2)
