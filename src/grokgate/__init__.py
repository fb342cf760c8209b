"""grokgate: a self-hosted gateway for the Grok Chat Completions API."""

__version__ = "0.1.0"
