"""The backend's options: one typed, validated object built from ``torch.compile(options=...)``.

Users pass a nested dict::

    torch.compile(model, backend="light_interaction",
                  options={"inner": "inductor", "context": {"keep_threshold": 0.2}, "cache": {"reuse_steps": 2}})

Every key is checked: an unknown key or a bad value raises ``ValueError`` naming the key and listing
what is valid, before anything is compiled. Each approximation the backend makes is a named option
here, with a default a user can start from.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

INNER_COMPILERS = ("inductor", "eager", "tensorrt")
SIMILARITY_MEASURES = ("proxy", "frustum")
WINDOW_RULES = ("shrink_on_motion", "grow_on_motion", "fixed")
PLANS = ("tiles", "frames")  # what a sparse plan is made of: see SparsityOptions
# context query rows of a full sequence (see SparsityOptions), widest first: each rule's plan is a
# superset of the next one's, the order calibration.widening_ladder widens them in (reversed)
CONTEXT_QUERY_RULES = ("dense", "camera", "frame_local")
CACHE_STORED = ("x0", "raw")  # what the denoising cache keeps: see li_compile.denoise_runtime
CACHE_SERVE = ("best", "blend")  # what a revisited frame is served: see li_compile.denoise_cache


# ``acts_with`` metadata: (the section's field, whether its value lets this option act, that value in words)
_TILES = ("plan", lambda v: v == "tiles", '"tiles"')
_ENABLED = ("enabled", lambda v: v is True, "True")
_MEASURED_WINDOW = ("window_rule", lambda v: v != "fixed", 'other than "fixed"')
# what makes a sparse plan, none of which acts while the context controller is off (every plan dense)
PLAN_SHAPING = ("plan", "recent_radius", "visibility_margin", "context_queries", "max_density", "flash_span")


def _choice(values: tuple[str, ...]) -> dict:
    return {"choices": values}


def _range(lo: float | None = None, hi: float | None = None, above_lo: bool = False) -> dict:
    """Valid values: [lo, hi], or (lo, hi] with ``above_lo``; None: unbounded."""
    return {"range": (lo, hi), "above_lo": above_lo}



@dataclass(frozen=True)
class SparsityOptions:
    """Block-sparse attention: whether attention sites run through ``li::planned_attention`` (the
    block-sparse kernel on the controller's plans), the token blocks its plans are cut into, and
    ``density``: below 1, each query block visits only that fraction of the key blocks its plan
    allows, those whose mean-pooled keys score highest against its mean-pooled queries (plus its
    own position's blocks). 1 (the default) computes exactly what the plan allows.

    ``plan``: ``"tiles"`` (default; needs the lens, ``Accelerator.configure(fov_y_deg=...)``): tokens
    in 3D tile order, one block one space-time tile, and per query tile only the key tiles the
    cameras say it needs (``controller.tile_plan``: its own chunk, a window of ``recent_radius``
    tiles around where its content was in each recent frame, the memory tiles whose ray cones the
    chunk's cameras see with ``visibility_margin``); ``"frames"``: whole dropped frames skipped only.
    ``context_queries``: the rule for the context's own query rows where every token is a query
    (HY's full sequence): ``"dense"`` (default: every key that holds a frame, exact; plan density
    0.85 on the trained world's full form), ``"camera"`` (their own frame, the chunk, the sinks, and
    the context tiles their own frame's camera needs, by the chunk rows' recent-window and ray-cone
    rules: on the trained world as faithful as dense at density 0.83-0.87, and on HY's full preset
    density 0.67-0.88, above ``max_density``, so it runs dense there) or ``"frame_local"`` (their own
    frame and the sinks: density 0.29-0.31, but on the trained world 17.9-29.0 dB on the worst chunk
    against dense and up to 1.15 dB worse than dense against the truth, as the error compounds from
    chunk to chunk). ``li_compile.calibrate`` tries frame-local, then camera rows, and keeps them only
    for heads where they hold the mass.

    ``max_density``: a plan whose block-sparse kernel would visit more than this share of the block
    pairs it runs (those outside the ``flash_span``; all of them without one) runs dense instead
    (flash; the site's own mask keeps the answer exact): on an H200 the block-sparse kernel runs at
    about 0.8 of flash's rate per visited block and the tile-order gathers cost a little more
    (``benchmarks/results/attention.md``). ``flash_span``: run the chunk's own keys through SDPA's
    fused kernel (cuDNN on the GPU) and the rest of the plan through the block-sparse kernel, merged
    by log-sum-exp (``kernels.split_attention``), where every query row's plan visits the chunk
    whole (chunk queries, or dense context rows); on the H200 that split is 1.49-1.76x faster than
    dense SDPA at density 0.5 on structured layouts, against 1.54-1.59x for the kernel alone."""

    enabled: bool = True
    # multiples of 16: the GPU kernel's smallest tile (another size would run every plan as masked dense there)
    block_q: int = field(default=128, metadata={**_range(16, 256), "multiple_of": 16})
    block_k: int = field(default=128, metadata={**_range(16, 256), "multiple_of": 16})
    density: float = field(default=1.0, metadata=_range(0.0, 1.0, above_lo=True))
    plan: str = field(default="tiles", metadata=_choice(PLANS))
    recent_radius: int = field(default=1, metadata={**_range(0, None), "acts_with": _TILES})
    visibility_margin: float = field(default=0.1, metadata={**_range(0.0, None), "acts_with": _TILES})
    context_queries: str = field(default="dense", metadata={**_choice(CONTEXT_QUERY_RULES), "acts_with": _TILES})
    max_density: float = field(default=0.6, metadata={**_range(0.0, 1.0), "acts_with": _TILES})
    flash_span: bool = field(default=True, metadata={"acts_with": _TILES})

    def __post_init__(self) -> None:
        _validate(self, "sparsity.")


@dataclass(frozen=True)
class ContextOptions:
    """Adaptive context: which memory frames to keep and how long the temporal window is.

    Window rule ``fixed`` (always ``window_max``), from ``benchmarks/trained_tradeoff.py`` on the
    trained world: against its dense run ``fixed`` keeps 78.6 dB mean / 34.5 dB worst frame,
    ``grow_on_motion`` 47.0 / 24.0 and ``shrink_on_motion`` (the published rule) 53.1 / 26.4, at no
    measured speed difference (the adaptive rules shorten the window where the latents change
    slowly, and this model reads those frames). On the random-weight tiny worlds
    (``benchmarks/window_rules.py``) ``grow_on_motion`` matched ``fixed``; the adaptive rules stay
    options. Keep threshold 0.1: rendered-content coverage -0.08 dB with 97% of the context.

    ``fill_density``: a chunk whose kept frames leave padding in their capacity bucket, and whose
    plan would still visit more than this share of its (query, key) pairs, gets the padding filled
    with the next-best memory frames (the dense policy's, whatever their score), up to ``memory_k``.
    Its context is then full, so it runs dense attention (flash, unmasked where the runner drops
    the mask of a full context) at no more cost than the padded plan, and with more context. The
    block-sparse kernel reaches about 75% of flash's rate on an H200, so denser plans ran slower
    than dense (``benchmarks/results/end_to_end.md``). 1.0: never fill.

    ``reuse_rows``: in a full-sequence model (``SequenceLayout.queries == "all"``), attention computes
    the context frames' rows only at a chunk's first computed step and its last step; the steps
    between reuse them and compute only the chunk's rows (``li_compile.context_rows``). Exact for a
    block-causal model; for a bidirectional one an approximation, measured on the trained world in
    ``benchmarks/results/context_reuse.md``. Needs the loop to tell the steps (``chunk.step(i)``) and
    the chunk's ``sigmas``, and the model's calls to repeat in the same order at every step (checked:
    a chunk where they do not raises when it ends); keeps one context-rows attention output per layer
    during a chunk. The model's first chunk that could reuse computes every row and checks that the
    context's keys in the first layer repeat between steps (they do not where one timestep conditions
    the whole sequence), and that the steps make the same number of calls. ``"auto"`` (the default):
    on with ``context.enabled`` and ``sparsity.enabled``, and off for a model that fails that check
    (the reason is in the chunk statistics); ``True``: on, and a failed check raises; ``False``: off.
    On an H100 at HY full's real depth a full-context miss took 0.71 of dense's time, for 6.9 GB more
    peak memory (``benchmarks/results/context_reuse.md``).

    ``row_blocks``: with ``reuse_rows``, the blocks ``li_compile.compile_repeated_blocks`` compiled
    run on the chunk's rows alone at the steps that reuse the context rows (their row-wise layers
    too, not only attention), with the context's keys and values kept per layer instead of its
    attention output (twice the memory). The probe chunk checks it against the whole block
    (``li_compile.row_blocks``); a model whose block fails the check keeps the attention-only reuse.
    """

    enabled: bool = True
    similarity: str = field(default="proxy", metadata=_choice(SIMILARITY_MEASURES))  # off, it ranks the memory_k kept
    keep_threshold: float = field(default=0.1, metadata={**_range(0.0, 1.0), "acts_with": _ENABLED})
    window_rule: str = field(default="fixed", metadata={**_choice(WINDOW_RULES), "acts_with": _ENABLED})
    window_min: int = field(default=1, metadata={**_range(1, None), "acts_with": _MEASURED_WINDOW})
    window_max: int = field(default=8, metadata=_range(1, None))
    fill_density: float = field(default=0.75, metadata={**_range(0.0, 1.0), "acts_with": _ENABLED})
    reuse_rows: bool | str = field(default="auto", metadata={"auto_bool": True})
    row_blocks: bool = False

    def __post_init__(self) -> None:
        _validate(self, "context.")
        if self.window_min > self.window_max:
            raise ValueError(
                f"context.window_min ({self.window_min}) must not exceed context.window_max ({self.window_max})"
            )


@dataclass(frozen=True)
class CacheOptions:
    """Denoising cache: how many early steps a revisit reuses, when a chunk counts as a revisit,
    how many past chunks are kept, and what is kept: the clean-latent prediction ("x0", served
    against the new chunk's own latent; needs the chunk's sigmas) or the raw model output ("raw").

    ``reuse_steps``: ``None`` (the default) serves every step but the last (3 of a 4-step sampler,
    2 of a 3-step one; without the chunk's sigmas the count is the fewest steps an earlier chunk
    ran, and the first such chunk serves nothing). On the trained world (``trained_ar``,
    ``benchmarks/results/trained_ar_plans.md``) a hit chunk then stays 32-64 dB from dense and as
    close to the renderer's truth as dense; on random-weight worlds, whose outputs do not denoise, a
    hit with one computed step ends about 15-22 dB from dense (``denoise_cache_reuse.md``): set an
    int, or ``"auto"``, for a model whose served steps have not been checked. ``"auto"``: measured
    on the model itself: its first ``AUTO_CALIBRATION_HITS`` revisits (``li_compile.denoise_runtime``)
    compute every step and compare each early step's fresh prediction with the one the cache would
    serve; from then on it reuses the most steps whose served predictions all stayed at or above
    ``reuse_target_db`` (PSNR), and the report says what it chose and why. The last step always
    computes, whatever the value.
    ``serve``: per revisited frame, the best-matching past frame's output (``"best"``) or the
    score-weighted average of every past frame matching at ``revisit_threshold`` (``"blend"``).
    ``near_reuse_steps`` / ``near_threshold``: a *near* revisit, whose every frame matches at
    ``near_threshold`` but not all at ``revisit_threshold``, has its first ``near_reuse_steps``
    steps served (never more than a revisit's); 0 (the default) computes it in full. What is
    computed after a near hit is not stored. A near match whose every frame matches the last camera
    of the chunk just before at least as well as what would serve it is the path going on, not a
    return: a miss. With near revisits on, ``near_threshold`` must be at most ``revisit_threshold``."""

    enabled: bool = True
    reuse_steps: int | str | None = field(default=None, metadata={**_range(0, None), "optional_int": True})
    reuse_target_db: float = field(default=30.0, metadata={**_range(0.0, None),
                                                            "acts_with": ("reuse_steps", lambda v: v == "auto", '"auto"')})
    revisit_threshold: float = field(default=0.9, metadata=_range(0.0, 1.0))
    capacity: int = field(default=64, metadata=_range(1, None))
    stored: str = field(default="x0", metadata=_choice(CACHE_STORED))
    serve: str = field(default="best", metadata=_choice(CACHE_SERVE))
    near_threshold: float = field(default=0.8, metadata={**_range(0.0, 1.0),
                                                         "acts_with": ("near_reuse_steps", lambda v: v > 0, "above 0")})
    near_reuse_steps: int = field(default=0, metadata=_range(0, None))

    def __post_init__(self) -> None:
        _validate(self, "cache.")
        default = CacheOptions.__dataclass_fields__["near_threshold"].default
        # checked where near revisits are on or it was set: a lower revisit_threshold alone is fine
        if self.near_threshold > self.revisit_threshold and (self.near_reuse_steps > 0 or self.near_threshold != default):
            raise ValueError(f"option 'cache.near_threshold' must be at most cache.revisit_threshold "
                             f"({self.revisit_threshold}), got {self.near_threshold}"
                             + (" (its default)" if self.near_threshold == default else ""))


@dataclass(frozen=True)
class Options:
    """Everything the light_interaction backend can be told. Build with ``Options.from_user``."""

    inner: str = field(default="inductor", metadata=_choice(INNER_COMPILERS))
    regional: bool = True  # compile each repeated block once (li_compile.regions), not the unrolled model
    sparsity: SparsityOptions = field(default_factory=SparsityOptions)
    context: ContextOptions = field(default_factory=ContextOptions)
    cache: CacheOptions = field(default_factory=CacheOptions)

    def __post_init__(self) -> None:
        _validate(self, "")
        if self.inner == "tensorrt":
            try:
                importlib.import_module("torch_tensorrt")  # (registers the "tensorrt" Dynamo backend)
            except Exception as exc:  # missing, or built for another torch: fails on import
                raise ImportError("light_interaction option inner='tensorrt' needs torch-tensorrt, which does not "
                                  f"import here ({type(exc).__name__}: {exc}): pip install li-compile[tensorrt]") from exc
        if self.context.row_blocks and self.context.reuse_rows is False:
            raise ValueError("option 'context.row_blocks' runs blocks on the chunk's rows at the steps that reuse the "
                             "context rows: it needs context.reuse_rows True or \"auto\", got False")
        if not self.context.enabled:
            shaping = [f"sparsity.{name}" for name in PLAN_SHAPING
                       if getattr(self.sparsity, name) != SparsityOptions.__dataclass_fields__[name].default]
            if shaping:
                raise ValueError(f"option(s) {shaping} shape the controller's plans, which context.enabled=False turns "
                                 "off (every plan dense): leave them out, or turn the controller on")
        if self.context.row_blocks and not (self.sparsity.enabled and (self.context.enabled or self.context.reuse_rows is True)):
            raise ValueError("option 'context.row_blocks' acts where the context rows are reused: it needs "
                             "sparsity.enabled=True, and context.enabled=True or context.reuse_rows=True")
        if self.context.reuse_rows is True and not self.sparsity.enabled:
            raise ValueError("option 'context.reuse_rows' needs sparsity.enabled=True: the rows are reused inside "
                             "the rewritten attention sites, which sparsity.enabled=False leaves to the inner compiler")

    @classmethod
    def from_user(cls, options: "Options | Mapping[str, Any] | None") -> "Options":
        """Validate what the user passed as ``torch.compile(..., options=)`` and return an ``Options``."""
        if options is None:
            return cls()
        if isinstance(options, Options):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(
                f"light_interaction options must be a dict or li_compile.Options, got {type(options).__name__}"
            )
        return _build(cls, options, prefix="")


def _validate(options: Any, prefix: str) -> None:
    """Check every field of an options dataclass as ``from_user`` checks a dict value (so
    ``Options(inner="xx")`` fails as ``{"inner": "xx"}`` does)."""
    for f in dataclasses.fields(options):
        value = _check(f, getattr(options, f.name), f"{prefix}{f.name}")
        object.__setattr__(options, f.name, value)  # a nested section given as a dict becomes its dataclass


# sections none of whose other options acts when ``enabled`` is False (context's dense policy still
# uses its window_max, so context is not one)
INERT_WHEN_DISABLED = ("sparsity", "cache")


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    """``cls`` from a user dict: unknown keys, bad values and options given where they cannot act
    (a disabled section's, or one whose ``acts_with`` field says otherwise) raise ``ValueError``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise ValueError(f"unknown option {path!r}; valid keys{' in ' + prefix[:-1] if prefix else ''}: {sorted(fields)}")
        kwargs[key] = _check(fields[key], value, path)
    built = cls(**kwargs)
    if prefix[:-1] in INERT_WHEN_DISABLED and kwargs.get("enabled") is False:
        others = sorted(f"{prefix}{k}" for k in kwargs if k != "enabled" and getattr(built, k) != fields[k].default)
        if others:  # (a key given its default value changes nothing, acting or not)
            raise ValueError(f"option(s) {others} cannot act with {prefix}enabled=False: leave them out")
    for key in kwargs:
        acts_with = fields[key].metadata.get("acts_with")
        if getattr(built, key) == fields[key].default:
            continue
        if acts_with is not None and not acts_with[1](getattr(built, acts_with[0])):
            raise ValueError(f"option {prefix + key!r} acts only with {prefix}{acts_with[0]} {acts_with[2]}, "
                             f"got {getattr(built, acts_with[0])!r}: set that too, or leave it out")
    return built


def _check(f: dataclasses.Field, value: Any, path: str) -> Any:
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if not dataclasses.is_dataclass(default) and not isinstance(value, (bool, int, float, str, type(None))):
        raise ValueError(f"option {path!r} must be a plain bool, number, string or None, "
                         f"got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(default):
        if isinstance(value, type(default)):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"option {path!r} must be a dict of {sorted(x.name for x in dataclasses.fields(default))}, got {value!r}")
        return _build(type(default), value, prefix=f"{path}.")
    if "choices" in f.metadata:
        if value not in f.metadata["choices"]:
            raise ValueError(f"option {path!r} must be one of {list(f.metadata['choices'])}, got {value!r}")
        return value
    if f.metadata.get("auto_bool"):
        if not (isinstance(value, bool) or value == "auto"):
            raise ValueError(f'option {path!r} must be True, False or "auto", got {value!r}')
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"option {path!r} must be True or False, got {value!r}")
        return value
    if f.metadata.get("optional_int"):
        if value is None or value == "auto":
            return value
        return _check_number(f, value, path, integer=True, kind='an int, None or "auto"')
    if isinstance(default, (int, float)):
        return _check_number(f, value, path, integer=isinstance(default, int))
    return value


def _check_number(f: dataclasses.Field, value: Any, path: str, integer: bool, kind: str | None = None) -> Any:
    kind = kind or ("an int" if integer else "a number")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ValueError(f"option {path!r} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"option {path!r} must be finite, got {value!r}")
    lo, hi = f.metadata.get("range", (None, None))
    above = f.metadata.get("above_lo", False)
    if (lo is not None and (value <= lo if above else value < lo)) or (hi is not None and value > hi):
        raise ValueError(
            f"option {path!r} must be in {'(' if above else '['}{lo}, {'inf' if hi is None else hi}], got {value!r}"
        )
    step = f.metadata.get("multiple_of")
    if step is not None and value % step:
        raise ValueError(f"option {path!r} must be a multiple of {step}, got {value!r}")
    return value

