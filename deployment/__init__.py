"""Deploy docker compose stacks to remote hosts over SSH, per environment."""

__version__ = "0.1.0"
