"""Timestep respacing: use a subset of a base diffusion's steps (Nichol & Dhariwal 2021, sec. 4)."""

import itertools
from typing import Any, Callable, Dict, Iterable, List, Set, Union

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts: Union[str, Iterable[int]]) -> Set[int]:
    """Choose which of the base diffusion's ``num_timesteps`` steps to keep.

    The steps are split into equal sections (the first ``num_timesteps % len(sections)`` sections one
    step longer); each section of ``size`` steps keeps ``count`` steps at the rounded positions
    ``0, s, s + s, ...`` with the float stride ``s = (size - 1) / (count - 1)``: a running float sum, rounded
    by Python's ``round`` (half to even), which is upstream improved-diffusion's rule to the last step.
    ``"ddimN"`` instead uses the smallest integer stride of the DDIM paper that gives exactly N steps.

    Args:
        num_timesteps: number of steps of the base diffusion.
        section_counts: e.g. "250" (250 steps overall), "10,15,20" (per third), [10, 15, 20], or "ddim50".

    Returns:
        Set of kept step indices in [0, num_timesteps).
    """
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                desired = int(spec[len("ddim") :])
            except ValueError:
                raise ValueError(
                    f"timestep_respacing: cannot parse {section_counts!r} (expected e.g. 'ddim50')"
                ) from None
            for stride in range(1, num_timesteps + 1):
                steps = range(0, num_timesteps, stride)
                if len(steps) == desired:
                    return set(steps)
            raise ValueError(
                f"timestep_respacing: no integer stride gives exactly {desired} of {num_timesteps} steps "
                f"for {section_counts!r}"
            )
        try:
            counts = [int(c) for c in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"timestep_respacing: cannot parse {section_counts!r} "
                "(expected e.g. '250', '10,10,10' or 'ddim50')"
            ) from None
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(
            f"timestep_respacing: section counts must be positive integers, got {section_counts!r}"
        )

    base, extra = divmod(num_timesteps, len(counts))
    kept: List[int] = []
    section_start = 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if count > size:
            raise ValueError(
                f"timestep_respacing: cannot keep {count} steps from a section of {size} steps "
                f"({section_counts!r} with {num_timesteps} diffusion steps)"
            )
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # Same step sets as upstream, which adds the float stride up step by step and rounds each partial
        # sum with Python's round (half to even). The running sum, not j * stride, decides the ties: at
        # T=1000, "21" has stride 49.95; ten additions give 499.49999999999994 -> 499, while 10 * 49.95 is
        # exactly 499.5 -> 500.
        positions = itertools.accumulate(itertools.repeat(stride, count - 1), initial=0.0)
        kept.extend(section_start + round(pos) for pos in positions)
        section_start += size
    return set(kept)


class _WrappedModel:
    """Calls the model with the base diffusion's timesteps instead of the respaced indices."""

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        timestep_map: List[int],
        rescale_timesteps: bool,
        original_num_steps: int,
    ) -> None:
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps

    def __call__(self, x: torch.Tensor, ts: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        map_tensor = torch.tensor(self.timestep_map, device=ts.device, dtype=torch.long)
        new_ts = map_tensor[ts.long()]
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion that keeps only the steps ``use_timesteps`` of a base diffusion.

    The kept steps get new betas so that alphas_cumprod at each kept step equals the base value; the model
    is wrapped so that it still sees the base diffusion's timesteps (``timestep_map[i]`` for index i).

    Args:
        use_timesteps: the base step indices to keep (e.g. from :func:`space_timesteps`).
        **kwargs: the base diffusion's arguments (``betas`` etc., see :class:`GaussianDiffusion`).
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs: Any) -> None:
        self.use_timesteps = set(int(t) for t in use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        if not self.use_timesteps or not all(0 <= t < self.original_num_steps for t in self.use_timesteps):
            raise ValueError(
                f"SpacedDiffusion: use_timesteps must be a non-empty subset of [0, {self.original_num_steps})"
            )
        base = GaussianDiffusion(**kwargs)
        self.timestep_map: List[int] = []
        new_betas = []
        last_alpha_cumprod = 1.0
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1.0 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas, dtype=np.float64)
        super().__init__(**kwargs)

    def p_mean_variance(self, model, *args, **kwargs) -> Dict[str, torch.Tensor]:  # noqa: D102
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs) -> Dict[str, torch.Tensor]:  # noqa: D102
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def _wrap_model(self, model: Callable[..., torch.Tensor]) -> _WrappedModel:
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map, self.rescale_timesteps, self.original_num_steps)

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        # The wrapped model does the mapping and scaling.
        return t
