"""The HTTP front: the OpenAI-compatible API, status, metrics and the web page."""
