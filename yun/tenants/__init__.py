"""Tenants, API keys, limits, priorities and usage metering, over one database (SQLite by
default, PostgreSQL to share account state between servers).

    models.py    the tables (SQLAlchemy 2)
    db.py        engine set-up (SQLite WAL / psycopg 3), schema creation and version
    keys.py      key generation and hashing
    store.py     tenants and keys: admin operations, key lookup
    limits.py    admission against the limits and settlement (the request ledger)
    metering.py  usage by day and model, CSV / JSON export
    metrics.py   Prometheus counters per tenant
    gate.py      what the HTTP server calls (async), knowing nothing of HTTP
    cli.py       `yun admin tenants|keys|usage`

Imports no torch and no web framework.
"""
