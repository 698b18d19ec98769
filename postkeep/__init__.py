"""postkeep: capture, sign, rate-limit and track every message through Postfix.

The modules directly in this package are the ground floor every daemon and
the CLI stand on, and import nothing above it: `config` (every key declared
once), `ids`, `envelope` (return paths), `process`, `ttlcache`, `windows`
(rate-limit windows), `signing_keys` (DKIM key types).  Above them:
`postkeep.storage` (the data layer), then the daemons (`postkeep.milter`,
`postkeep.policyd`, `postkeep.storage.sidecar`) and the CLI (`postkeep.cli`).
"""

__version__ = "0.1.0"
