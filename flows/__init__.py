"""Prefect flows and the CLI. Prefect's settings are read at import, so the defaults are set here, first."""

import os

for _name, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # A temporary server starts with every flow run when no PREFECT_API_URL is set; 2 cores need time for it.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    # The temporary server is stopped when the command ends, often while it still flushes task-run events after an
    # interrupt or a failure; its shutdown tracebacks would bury the CLI's one-line message.
    "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Model-loading bars from transformers would break the CLI's own progress display.
    "TQDM_DISABLE": "1",
}.items():
    os.environ.setdefault(_name, _value)
