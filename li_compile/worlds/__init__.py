"""Reference world models and the generation loop every speedup is measured against.

- ``hy_worldplay``: HY-WorldPlay-style full-sequence DiT with reconstituted context memory.
- ``matrix_game3``: Matrix-Game-3.0-style Wan DiT with a per-chunk KV cache of context frames.
- ``diffusers_world``: diffusers' ``WanTransformer3DModel`` / ``HunyuanVideo15Transformer3DModel`` as a world
  (needs the ``diffusers`` extra).
- ``trajectories``: seeded camera paths with exact revisits, and Matrix-Game actions.
- ``pipeline``: the chunk loop (``generate``), ``ContextSelection``, ``DensePolicy``, ``warm_up``.
- ``base`` (``WorldSpec``, ``World``), ``layers``, ``sampling``, ``decode``: shared parts.
- ``report_tools``: what the examples share (dense vs light_interaction runs, metrics, plots).

    from li_compile.worlds import hy_worldplay, trajectories
    from li_compile.worlds.pipeline import generate
    world = hy_worldplay.build("tiny")
    result = generate(world, trajectories.make("loop", 32))
"""
