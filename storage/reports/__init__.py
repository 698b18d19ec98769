"""Delivery reports: what a DSN or bounce says, and each recipient's status.

`dsn` parses a report (pure functions over bytes); `outcomes` records it in
PostgreSQL, where migrations 0004/0008/0011 decide the recipient's and the
message's status.  May import the ground floor and storage.metadata.
"""
