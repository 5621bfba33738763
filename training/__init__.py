"""Research code of the trained worlds, kept out of the installed package: the scene renderer
(``scenes``), training clips (``data``), the recipe (``recipe``), data-parallel helpers
(``data_parallel``), held-out fidelity (``fidelity``) and the training scripts. Run from the
repository root (``python -m training.train_world``, ``bash training/run_trained_ar.sh``);
the worlds themselves and their weights loader are ``li_compile.worlds``."""
