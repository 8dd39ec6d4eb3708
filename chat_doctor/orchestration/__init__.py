"""Orchestration: Prefect glue shared by the steps and the flow (which server a run reports to, the
step decorator). May import chat_doctor.core and chat_doctor.config."""
