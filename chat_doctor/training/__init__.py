"""Training: the train step's insides. The launcher (plan, launch) starts the recipe in its own
process(es) by command line only; the recipe builds the Trainer (trainer, callbacks, packing,
attention, offload). Preflight checks a machine and a base before any data step. May import
chat_doctor.core, config, data, models and tracking."""
