"""postkeep.policyd: postkeep-policyd, the policy-delegation server (tier rate limits).

`server` (the policy protocol's framing, asyncio) -> `service` (one request's
way to an answer, PostgreSQL or lease mode) -> `decide` (pure: plans, verdicts,
local counters); `protocol` parses and formats the attribute lines; `daemon`
is the process.  Counters live in PostgreSQL (postkeep.storage.metadata.limits).
"""
