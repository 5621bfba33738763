"""A diffusers video transformer as a world model: dense (Inductor) vs light_interaction along a camera path.

``--model wan`` (``WanTransformer3DModel``, the default) or ``--model hunyuan_video_15``
(``HunyuanVideo15Transformer3DModel``, HY-WorldPlay's base) is built at a small config with random
weights (``li_compile.worlds.diffusers_world``) and driven through the public chunk loop: the
controller selects the context frames, the denoising cache serves early steps of revisits and the
tile plans sparsify the video self-attention. Needs the ``diffusers`` extra (``pip install -e ".[diffusers]"``).

    python examples/diffusers_world.py --model wan --chunks 8
    python examples/diffusers_world.py --model hunyuan_video_15 --chunks 8 --json out/hy15.json
    python examples/diffusers_world.py --model wan --preset small --device cuda --chunks 32

The other flags are those of ``examples/hy_worldplay.py`` (``--help``).
"""

import argparse
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from li_compile.worlds import diffusers_world
from li_compile.worlds.report_tools import run_example

if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", choices=sorted(diffusers_world.MODELS), default="wan")
    chosen, rest = parser.parse_known_args()
    world = SimpleNamespace(__doc__=f"{__doc__.splitlines()[0]} (--model {chosen.model})",
                            PRESET_NAMES=diffusers_world.PRESET_NAMES,
                            build=partial(diffusers_world.build, model=chosen.model))
    run_example(world, default_trajectory="loop", argv=rest)
