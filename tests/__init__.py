"""The test suite: unit/, contract/, controller/ (the operator) and e2e/ tiers; support/ and
data/ hold what they share."""
