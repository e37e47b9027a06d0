"""`mixquant load`: a multi-turn agent load generator for OpenAI-compatible endpoints."""
