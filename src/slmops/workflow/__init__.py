"""Workflows: a model, data and ordered passes from one config file (Olive's shape), run by the engine
that the `finetune`, `auto-opt` and `generate-adapter` commands use too."""
