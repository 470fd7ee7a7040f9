"""Helpers shared by the test tiers (and the operator benchmark): no tests here."""
