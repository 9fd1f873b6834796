"""`yun admin tenants|keys|usage`: the operator's commands, on the tenants database
directly (the same operations as the server's /admin API)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from typing import Any

from yun.tenants.models import LIMIT_FIELDS, PRIORITY_CLASSES

LIMIT_HELP = {
    "requests_per_minute": "Most requests started in any 60 s.",
    "tokens_per_minute": "Most tokens (prompt + completion) of the requests started in any "
                         "60 s; running requests count for their reservation (prompt + "
                         "max_tokens x n).",
    "max_concurrent": "Most requests running at once.",
    "tokens_per_day": "Token quota per UTC day.",
    "tokens_per_month": "Token quota per UTC month.",
}


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--database", default=None,
                   help="The tenants database (postgresql://USER:PASSWORD@HOST/DB or "
                        "sqlite:///PATH); the same as `yun serve --database`. Default: "
                        "tenants.db under the data folder ($YUN_DATA_DIR, else "
                        "$XDG_DATA_HOME/yun, else ~/.local/share/yun).")
    return p


def _add_limits(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group(f"limits of the {what} (default: none)")
    for name in LIMIT_FIELDS:
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None,
                       metavar="N", help=LIMIT_HELP[name])


def _limits_of(args: argparse.Namespace) -> dict[str, int | None]:
    return {n: getattr(args, n) for n in LIMIT_FIELDS if getattr(args, n) is not None}


def add_admin_parser(sub: Any) -> None:
    """Register `yun admin` (called once from yun/cli.py)."""
    common = _common()
    admin = sub.add_parser("admin", help="Tenants, API keys and usage (the tenants database).",
                           description="Manage the tenants of `yun serve --tenants`: their "
                                       "keys, limits and usage records.")
    groups = admin.add_subparsers(dest="admin_group", required=True, metavar="GROUP")

    t = groups.add_parser("tenants", help="Create, list, update, disable tenants.")
    tc = t.add_subparsers(dest="admin_cmd", required=True, metavar="ACTION")
    p = tc.add_parser("create", parents=[common], help="Create a tenant.")
    p.add_argument("name", help="The tenant's name (unique).")
    p.add_argument("--class", dest="priority_class", default="interactive",
                   choices=sorted(PRIORITY_CLASSES),
                   help="Scheduling class: interactive requests are admitted and scheduled "
                        "before batch ones and preempted after them (default: %(default)s).")
    _add_limits(p, "tenant")
    p.set_defaults(func=_tenant_create)
    p = tc.add_parser("list", parents=[common], help="List tenants (JSON).")
    p.set_defaults(func=_tenant_list)
    p = tc.add_parser("update", parents=[common], help="Change a tenant's class or limits.")
    p.add_argument("name", help="The tenant's name.")
    p.add_argument("--class", dest="priority_class", default=None,
                   choices=sorted(PRIORITY_CLASSES), help="The new scheduling class.")
    _add_limits(p, "tenant")
    p.set_defaults(func=_tenant_update)
    for action, helptext in (("disable", "Refuse the tenant's keys (401) from now on."),
                             ("enable", "Accept the tenant's keys again.")):
        p = tc.add_parser(action, parents=[common], help=helptext)
        p.add_argument("name", help="The tenant's name.")
        p.set_defaults(func=_tenant_disable if action == "disable" else _tenant_enable)

    k = groups.add_parser("keys", help="Create, list, revoke API keys.")
    kc = k.add_subparsers(dest="admin_cmd", required=True, metavar="ACTION")
    p = kc.add_parser("create", parents=[common],
                      help="Create a key for a tenant; it is printed once, only its hash is "
                           "kept.")
    p.add_argument("tenant", help="The tenant the key belongs to.")
    p.add_argument("--name", default="", help="A label for the key (shown by `keys list`).")
    p.add_argument("--model", dest="models", action="append", default=None,
                   help="Allow only this model (repeatable). Default: every model.")
    p.add_argument("--expires", default=None,
                   help="When the key stops working: an age (30d, 12h, 90m) or an ISO date "
                        "or time (UTC unless it says otherwise). Default: never.")
    _add_limits(p, "key")
    p.set_defaults(func=_key_create)
    p = kc.add_parser("list", parents=[common], help="List keys (JSON; never the keys).")
    p.add_argument("--tenant", default=None, help="Only this tenant's keys.")
    p.set_defaults(func=_key_list)
    p = kc.add_parser("revoke", parents=[common], help="Revoke a key (401 from now on).")
    p.add_argument("key_id", type=int, help="The key's id (from `keys list`).")
    p.set_defaults(func=_key_revoke)

    p = groups.add_parser("usage", parents=[common],
                          help="Export usage records (one per request).",
                          description="One usage record per API request: tenant, key, "
                                      "model, status, tokens, times.")
    p.add_argument("--since", default="30d",
                   help="From this date (2026-12-01), ISO time or age (7d, 12h) on "
                        "(default: %(default)s).")
    p.add_argument("--tenant", default=None, help="Only this tenant's records.")
    p.add_argument("--format", default="csv", choices=("csv", "json"),
                   help="Output format (default: %(default)s).")
    p.set_defaults(func=_usage)


def _store(args: argparse.Namespace):
    from yun.tenants.store import TenantStore

    return TenantStore(args.database)


def _print(value: Any) -> int:
    print(json.dumps(value, indent=1))
    return 0


def _tenant_create(args: argparse.Namespace) -> int:
    from yun.tenants.store import Limits

    return _print(_store(args).create_tenant(args.name, args.priority_class,
                                             Limits(**_limits_of(args))))


def _tenant_list(args: argparse.Namespace) -> int:
    return _print(_store(args).list_tenants())


def _tenant_update(args: argparse.Namespace) -> int:
    return _print(_store(args).update_tenant(args.name, priority_class=args.priority_class,
                                             limits=_limits_of(args)))


def _tenant_disable(args: argparse.Namespace) -> int:
    return _print(_store(args).update_tenant(args.name, disabled=True))


def _tenant_enable(args: argparse.Namespace) -> int:
    return _print(_store(args).update_tenant(args.name, disabled=False))


def _expiry(value: str | None) -> float | None:
    if value is None:
        return None
    from yun.tenants.periods import parse_since

    v = value.strip()
    if v[-1:] in "dhm" and v[:-1].isdigit():  # an age: that long from now
        return 2 * datetime.now(timezone.utc).timestamp() - parse_since(v)
    return parse_since(v)


def _key_create(args: argparse.Namespace) -> int:
    from yun.tenants.store import Limits

    key, info = _store(args).create_key(args.tenant, args.name, args.models,
                                        _expiry(args.expires), Limits(**_limits_of(args)))
    print("yun: this key is shown only now; store it safely:", file=sys.stderr)
    print(key)
    print(json.dumps(info, indent=1), file=sys.stderr)
    return 0


def _key_list(args: argparse.Namespace) -> int:
    return _print(_store(args).list_keys(args.tenant))


def _key_revoke(args: argparse.Namespace) -> int:
    return _print(_store(args).revoke_key(args.key_id))


def _usage(args: argparse.Namespace) -> int:
    from yun.tenants import metering
    from yun.tenants.periods import parse_since

    rows = metering.records(_store(args), parse_since(args.since), args.tenant)
    sys.stdout.write(metering.to_csv(rows) if args.format == "csv" else
                     metering.to_json(rows) + "\n")
    return 0
