"""Orchestration: Prefect glue shared by the steps and the flow (which server a run reports to, the
step decorator, when a data step's cached result still holds). May import chat_doctor.core and
chat_doctor.config."""
