"""Real processes end to end: local runs, and the production path through the operator."""
