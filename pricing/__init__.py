"""Cost of LLM responses in dollars: the bundled price table and the pure cost function."""
