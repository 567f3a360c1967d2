"""tokenmill: an OpenAI-compatible LLM server where the concurrency model is a switch."""

__version__ = "0.1.0"
