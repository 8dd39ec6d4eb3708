"""Prefect flows and deployments: wiring only. May import tasks/ and chat_doctor."""
