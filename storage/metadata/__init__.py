"""PostgreSQL: connections, migrations, and the SQL of every table but reports'.

Each module owns its tables' SQL (`messages`, `directory`, `limits`,
`dkim_keys`, `legal_holds`, `audit`); the schema itself lives only in
`migrations/`.  May import the ground floor (`postkeep.config`, ids,
windows, signing_keys) and nothing else of storage.
"""
