"""A run's `status`: its schema (`schema`), the pure computation from what is observed
(`observe`), and writing it with events on transitions (`write`)."""
