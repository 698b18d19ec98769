"""postkeep-storage, the daemon beside Postfix.

`daemon` (the process), `lmtp` (the LMTP handler that takes Postfix's
delivery reports, and the batcher that records them), `upkeep` (periodic
jobs) and `retention_job` (retention on a schedule).  May import anything in
storage and the ground floor; never another daemon.
"""
