"""The credentials of the test S3 server (moto accepts any; these travel like real ones)."""

S3_KEY, S3_SECRET = "testing-key", "testing-secret"
BUCKET = "codistill-test"
