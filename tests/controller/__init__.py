"""The operator: its pure logic, and kopf running its handlers against an API server."""
