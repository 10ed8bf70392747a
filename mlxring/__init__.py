"""mlxring: one LLM across several Macs, served as one OpenAI-compatible endpoint."""

__version__ = "0.1.0"
