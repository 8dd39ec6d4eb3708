"""Pipeline steps. Each module is one step: plain functions that take a config section and paths."""
