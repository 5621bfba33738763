"""The options object: defaults, nested dicts, and clear errors for bad keys and values."""

import numpy as np
import pytest
import torch

import li_compile
from li_compile import CacheOptions, ContextOptions, Options, SparsityOptions
from li_compile.options import INNER_COMPILERS


def test_defaults_when_no_options_given():
    opts = Options.from_user(None)
    assert opts == Options()
    assert opts.inner == "inductor"


def test_nested_dict_sets_section_fields():
    opts = Options.from_user({"inner": "eager", "sparsity": {"block_k": 64}, "cache": {"reuse_steps": 3}})
    assert opts.inner == "eager"
    assert opts.sparsity.block_k == 64
    assert opts.sparsity.block_q == Options().sparsity.block_q
    assert opts.cache.reuse_steps == 3
    assert opts.context == Options().context
    assert Options.from_user({"cache": {"reuse_steps": None}}).cache.reuse_steps is None  # every step but the last
    # below the near threshold's default: fine while near revisits are off
    assert Options.from_user({"cache": {"revisit_threshold": 0.5}}).cache.revisit_threshold == 0.5


@pytest.mark.parametrize(
    "options, names",
    [
        ({"speed": "max"}, ["'speed'", "inner", "sparsity"]),
        ({"sparsity": {"blok_q": 64}}, ["'sparsity.blok_q'", "block_q"]),
        ({"inner": "tvm"}, ["'inner'", *INNER_COMPILERS]),
        ({"context": {"keep_threshold": 1.5}}, ["'context.keep_threshold'", "[0.0, 1.0]"]),
        ({"context": {"fill_density": -0.1}}, ["'context.fill_density'", "[0.0, 1.0]"]),
        ({"context": {"keep_threshold": float("nan")}}, ["'context.keep_threshold'", "finite"]),
        ({"sparsity": {"block_q": 8}}, ["'sparsity.block_q'", "[16, 256]"]),
        ({"sparsity": {"block_k": 24}}, ["'sparsity.block_k'", "multiple of 16", "24"]),
        ({"context": {"reuse_rows": np.array([1, 2])}}, ["'context.reuse_rows'", "plain bool", "ndarray"]),
        ({"cache": {"reuse_steps": np.int64(2)}}, ["'cache.reuse_steps'", "plain bool", "int64"]),
        ({"sparsity": {"density": 0.0}}, ["'sparsity.density'", "(0.0, 1.0]"]),
        ({"sparsity": {"density": 1.2}}, ["'sparsity.density'", "(0.0, 1.0]"]),
        ({"cache": {"reuse_steps": 1.5}}, ["'cache.reuse_steps'", "an int"]),
        ({"cache": {"reuse_steps": -1}}, ["'cache.reuse_steps'", "[0, inf]"]),
        ({"cache": {"reuse_steps": "half"}}, ["'cache.reuse_steps'", "an int"]),
        ({"cache": {"enabled": "yes"}}, ["'cache.enabled'", "True or False"]),
        ({"context": {"window_rule": "grow_on_motion", "window_min": 9, "window_max": 4}}, ["window_min", "window_max"]),
        ({"context": {"window_min": 4}}, ["'context.window_min'", 'context.window_rule other than "fixed"']),
        ({"context": {"enabled": False, "window_rule": "grow_on_motion"}}, ["'context.window_rule'", "context.enabled True"]),
        ({"context": {"enabled": False, "fill_density": 0.5}}, ["'context.fill_density'", "context.enabled True"]),
        ({"context": {"enabled": False}, "sparsity": {"recent_radius": 3}}, ["sparsity.recent_radius", "context.enabled=False"]),
        ({"context": {"enabled": False}, "sparsity": {"plan": "frames"}}, ["sparsity.plan", "context.enabled=False"]),
        ({"context": {"enabled": False}, "sparsity": {"flash_span": False}}, ["sparsity.flash_span", "context.enabled=False"]),
        ({"sparsity": {"plan": "frames", "max_density": 0.9}}, ["'sparsity.max_density'", 'sparsity.plan "tiles"']),
        ({"sparsity": {"plan": "frames", "flash_span": False}}, ["'sparsity.flash_span'", 'sparsity.plan "tiles"']),
        ({"cache": {"enabled": False, "capacity": 8}}, ["cache.capacity", "cache.enabled=False"]),
        ({"context": {"row_blocks": True}, "sparsity": {"enabled": False}}, ["'context.row_blocks'", "sparsity.enabled=True"]),
        ({"context": {"row_blocks": True, "enabled": False}}, ["'context.row_blocks'", "context.reuse_rows=True"]),
        ({"context": "fast"}, ["'context'", "keep_threshold"]),
        ({"cache": {"near_threshold": 0.95, "near_reuse_steps": 1}}, ["'cache.near_threshold'", "revisit_threshold", "0.95"]),
        ({"cache": {"near_threshold": 0.7}}, ["'cache.near_threshold'", "cache.near_reuse_steps above 0", "got 0"]),
        ({"cache": {"reuse_target_db": 25.0}}, ["'cache.reuse_target_db'", 'cache.reuse_steps "auto"', "got None"]),
        ({"cache": {"enabled": False, "near_reuse_steps": 1}}, ["cache.near_reuse_steps", "cache.enabled=False"]),
        ({"sparsity": {"enabled": False, "density": 0.5}}, ["sparsity.density", "sparsity.enabled=False"]),
        ({"sparsity": {"plan": "frames", "recent_radius": 2}}, ["'sparsity.recent_radius'", 'sparsity.plan "tiles"']),
        ({"context": {"enabled": False, "keep_threshold": 0.2}}, ["'context.keep_threshold'", "context.enabled True"]),
        ({"cache": {"revisit_threshold": 0.5, "near_reuse_steps": 1}}, ["'cache.near_threshold'", "0.8 (its default)"]),
        ({"cache": {"near_reuse_steps": -1}}, ["'cache.near_reuse_steps'", "[0, inf]"]),
        ({"context": {"reuse_rows": 1}}, ["'context.reuse_rows'", "True, False or \"auto\""]),
        ({"context": {"reuse_rows": True}, "sparsity": {"enabled": False}}, ["'context.reuse_rows'", "sparsity.enabled"]),
    ],
)
def test_bad_options_name_the_key_and_the_valid_values(options, names):
    with pytest.raises(ValueError) as err:
        Options.from_user(options)
    for name in names:
        assert name in str(err.value)


@pytest.mark.parametrize("options", [
    {"context": {"enabled": False, "similarity": "frustum"}},  # off, the controller still ranks the memory it keeps
    {"context": {"enabled": False, "keep_threshold": 0.1}},  # a default value changes nothing, acting or not
    {"cache": {"enabled": False, "reuse_steps": None}},
    {"context": {"enabled": False, "reuse_rows": True, "row_blocks": True}},
])
def test_options_that_act_or_keep_their_defaults_are_accepted(options):
    Options.from_user(options)


def test_bad_options_fail_at_compile_time_through_torch_compile():
    fn = torch.compile(lambda x: x + 1, backend="light_interaction", options={"sparsity": {"blok_q": 64}})
    with pytest.raises(Exception, match="sparsity.blok_q"):
        fn(torch.ones(2))


@pytest.mark.parametrize("depth", [1, 4])  # 4 repeated blocks: compiled regionally, each region alone
def test_tensorrt_inner_without_torch_tensorrt_says_how_to_install(depth):
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torch-tensorrt is installed here, so there is no missing-extra error to show")
    blocks = torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU()) for _ in range(depth)))
    fn = torch.compile(blocks, backend="light_interaction", options={"inner": "tensorrt"})
    with pytest.raises(Exception, match=r"pip install li-compile\[tensorrt\]"):
        fn(torch.ones(2, 4))
    with pytest.raises(ImportError, match=r"pip install li-compile\[tensorrt\]"):
        li_compile.compile_repeated_blocks(blocks, {"inner": "tensorrt"})


@pytest.mark.parametrize(
    "build, names",
    [
        (lambda: Options(inner="xx"), ["'inner'", "inductor"]),
        (lambda: ContextOptions(keep_threshold=-3), ["'context.keep_threshold'", "[0.0, 1.0]"]),
        (lambda: CacheOptions(capacity=0), ["'cache.capacity'"]),
        (lambda: SparsityOptions(block_q=8), ["'sparsity.block_q'"]),
        (lambda: Options(context={"keep_threshold": 2.0}), ["'context.keep_threshold'"]),
    ],
)
def test_options_built_directly_validate_like_a_dict(build, names):
    with pytest.raises(ValueError) as err:
        build()
    for name in names:
        assert name in str(err.value)


def test_options_given_to_torch_compile_reach_the_models_controller():
    import li_compile

    compiled = torch.compile(torch.nn.Linear(2, 2), backend="light_interaction",
                             options={"context": {"keep_threshold": 0.7, "window_max": 3}})
    accelerator = li_compile.accelerator(compiled)
    accelerator.configure(memory_k=2)
    assert accelerator.controller.options == ContextOptions(keep_threshold=0.7, window_max=3)
    assert Options(context={"window_max": 3}).context == ContextOptions(window_max=3)  # a dict section is built
