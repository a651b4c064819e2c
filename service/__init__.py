"""The agent-runner service: runs, admission, events, webhooks, logs and metrics, over one backend."""
