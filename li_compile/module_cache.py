"""The denoising cache at the boundary of a compiled model's call, for models Dynamo cannot capture whole.

The sampler pass puts a model call behind the cache when the call is one graph. A graph break
inside the model's forward (HunyuanVideo 1.5's ``if torch.all(image_embeds == 0)``, boolean
indexing, ``.item()``) cuts the call into several graphs, none of which is the call: the pass
reports the site as skipped. ``cached(compiled, latent=..., timestep=...)`` takes the decision one
level up, around the whole call of the compiled model: on an early step of a revisit it returns the
stored output without calling the model at all, else it calls the model (every graph of it) and
stores the output. It is the same per-step decision as the graph-level runner
(``DenoiseRuntime.step``), with the same cache key: the identity and version of the model's
parameters and buffers, and the digest of every argument but the latent, the timestep and the
accelerator's ``revisit_inputs``. While the wrapper computes a call, graph-level runners inside it
only compute, so a step is never counted twice.
"""

from __future__ import annotations

from typing import Any, Hashable

import torch

from li_compile.accelerator import _compiled_target, accelerator, compiled_signature
from li_compile.cache_key import check_revisit_inputs, named_arguments


class CachedCalls:
    """``compiled`` (a ``torch.compile`` result with the light_interaction backend) whose calls go
    through its accelerator's denoising cache. ``latent``, ``timestep``: the names of the forward's
    noisy-latent and timestep arguments; ``weights``: the module whose parameters and buffers key the
    cache (default: the compiled module; required for a compiled function). The model must return the latent-shaped output alone, as a
    1-tuple, or as an output object with a single ``sample`` field (diffusers' ``return_dict``)."""

    def __init__(self, compiled: Any, latent: str, timestep: str, weights: torch.nn.Module | None = None) -> None:
        target, _ = _compiled_target(compiled)
        weights = weights if weights is not None else target
        if not isinstance(weights, torch.nn.Module):
            raise ValueError(f"{getattr(target, '__name__', target)!r} is a compiled function: name the module whose "
                             "weights it computes with, cached(..., weights=model), so that new weights never hit "
                             "outputs of the old ones")
        self.signature = compiled_signature(compiled)  # a wrapper module's declared one; a method's own
        if self.signature is None:
            raise ValueError(f"{getattr(target, '__name__', type(target).__name__)} has no signature to find "
                             f"{latent!r} and {timestep!r} in")
        for name in (latent, timestep):
            if name not in self.signature.parameters:
                raise ValueError(f"{type(target).__name__} takes no argument {name!r}; its arguments are "
                                 f"{list(self.signature.parameters)}")
        self.compiled, self.latent, self.timestep = compiled, latent, timestep
        self.accelerator = accelerator(compiled)
        self.accelerator.boundary_cache = (f"li_compile.cached(latent={latent!r}, timestep={timestep!r}) serves "
                                           "every call of the model, also where its sampler sites are skipped")
        self.module = weights
        self.wrap: Any = None  # how the model returns its output: learnt from the first computed call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        arguments = named_arguments(self.signature.bind(*args, **kwargs))
        latents = arguments[self.latent]
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"the latent argument {self.latent!r} must be a tensor, got {type(latents).__name__}")
        runtime = self.accelerator.denoise

        def compute() -> torch.Tensor:
            with runtime.outer_call():
                out = self.compiled(*args, **kwargs)
            tensor, self.wrap = _unwrap(out)
            return tensor

        served = runtime.step(self, lambda: self._key(arguments), latents, compute, timestep=arguments.get(self.timestep))
        if self.wrap is None:  # served from entries another runner stored: learn the output's form once
            compute()
        return self.wrap(served)

    def _key(self, arguments: dict[str, Any]) -> Hashable | None:
        check_revisit_inputs(self.accelerator.revisit_inputs, self.signature, "the cached call")
        excluded = {self.latent, self.timestep, *self.accelerator.revisit_inputs}
        weights = [*self.module.parameters(), *self.module.buffers()]  # now: load_state_dict(assign=True) swaps them
        return self.accelerator.cache_key(weights, [v for k, v in arguments.items() if k not in excluded])


def cached(compiled: Any, latent: str, timestep: str, weights: torch.nn.Module | None = None) -> CachedCalls:
    """``compiled`` behind the denoising cache at its call boundary (``CachedCalls``): use it in the
    chunk loop in place of ``compiled`` when the report shows its sampler site skipped because a
    graph break splits the model call."""
    return CachedCalls(compiled, latent, timestep, weights)


def _unwrap(out: Any) -> tuple[torch.Tensor, Any]:
    """(the latent-shaped output, a function that puts a tensor back in ``out``'s form)."""
    if isinstance(out, torch.Tensor):
        return out, lambda t: t
    if isinstance(out, tuple) and len(out) == 1 and isinstance(out[0], torch.Tensor):
        return out[0], lambda t: (t,)
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor) and len(getattr(out, "keys", lambda: ())()) == 1:
        kind = type(out)
        return sample, lambda t: kind(sample=t)
    raise TypeError(f"a cached call must return its output tensor alone, as a 1-tuple or with a single 'sample' "
                    f"field, got {type(out).__name__}")
