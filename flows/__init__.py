"""Prefect flows and deployments: wiring only."""
