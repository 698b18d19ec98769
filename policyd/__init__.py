"""postkeep.policyd: the Postfix policy-delegation server (tier rate limits).

Not built yet: see the policy daemon issue.
"""
