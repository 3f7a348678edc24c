"""The API gateway service: every request verified, authorised by policy, rate-limited, audited."""
