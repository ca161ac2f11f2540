"""openai/guided-diffusion integration: a PPAP guide as guided-diffusion's ``cond_fn``.

    from ppap_fast.integrations.guided_diffusion import as_cond_fn
    sample = diffusion.ddim_sample_loop(model, shape, cond_fn=as_cond_fn(guide), model_kwargs={})

``cond_fn(x, t, y=None, **kw)`` returns ``guide(x, t)`` (the scaled gradient of log p(y | x_t));
``y`` overrides the target of a ClassGuide / X0HatGuide, also of those sub-guides of a ComposedGuide
(and through a ``fast_sampling.FastGuide``). ``t`` arrives as the ORIGINAL timestep
(SpacedDiffusion maps respaced indices before calling cond_fn), which is what an ExpertBank
routes by; a diffusion made with ``rescale_timesteps=True`` passes float ``t * 1000 / T`` instead, which
``as_cond_fn(guide, num_timesteps=T)`` maps back to the original t (without T: a ValueError naming the fix).
Passing ``num_timesteps`` also checks the guide's ExpertBanks against T. This is :func:`ppap_fast.guidance.as_cond_fn`, re-exported (not a copy).
"""
from __future__ import annotations

from ppap_fast.guidance import as_cond_fn

__all__ = ["as_cond_fn"]
