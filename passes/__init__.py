"""FX graph rewrites run by the light_interaction backend, in order (see ``PASSES``)."""
