"""Pipeline steps, one module each: a plain function (config section and input records in, its output
record out) and, at the module's foot, its Prefect task (retries, cache policy, artifacts). Steps may
import chat_doctor, never each other or flows/."""
