"""The identity commands: ``fedge ca init|fleet|site|crl|broker-config``, ``fedge enroll``,
``fedge revoke``.

Argument parsing and what each command prints; the work is in ``fedge_cli.pki`` (layout of a
CA directory and of an identity in its docstring).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedge_cli.pki import (
    ACL_TEMPLATE,
    CRL_DAYS,
    DEFAULT_FLEET,
    DEFAULT_HOSTS,
    add_fleet,
    add_site,
    enroll,
    init_ca,
    revoke,
    write_broker_config,
    write_crl,
)

__all__ = ["add_arguments"]


def _ca_init(args: argparse.Namespace) -> None:
    ca = init_ca(args.dir, tuple(args.host or DEFAULT_HOSTS), args.fleet)
    print(f"CA in {ca.root}; broker files in {ca.broker}; aggregator identity in {ca.aggregator}")
    print(f"fedge status's read-only identity (monitor) in {ca.monitor}")
    print(f"the broker's ACL ({ca.acl}) allows fleet {args.fleet!r} only")


def _ca_fleet(args: argparse.Namespace) -> None:
    ids = add_fleet(args.dir, args.fleet)
    print(
        f"fleet {ids.fleet}: aggregator identity {ids.aggregator_name} in {ids.aggregator}, "
        f"monitor {ids.monitor_name} in {ids.monitor}, device keys in {ids.keys}"
    )
    print("enroll its devices with: fedge enroll DEVICE --fleet " + ids.fleet)
    print("send SIGHUP to the broker to load the new ACL and passwords")


def _ca_site(args: argparse.Namespace) -> None:
    f = add_site(
        args.dir,
        args.site,
        central_host=args.central_host,
        central_port=args.central_port,
        fleet=args.fleet,
        site_hosts=tuple(args.site_host or DEFAULT_HOSTS),
    )
    print(f"site {f.site} in {f.home}: bridge identity {f.bridge_name} in {f.bridge}")
    print(f"gateway identity {f.gateway_name} in {f.gateway}; site ACL {f.acl}")
    print(f"bridge to {args.central_host}:{args.central_port} in {f.bridge_conf} (0600)")
    print("send SIGHUP to the central broker to load the new ACL block and passwords")
    print(f"site broker config: fedge ca broker-config --dir {args.dir} --site {f.site} ...")


def _ca_crl(args: argparse.Namespace) -> None:
    print(f"wrote {write_crl(args.dir, args.days)}; send SIGHUP to the broker to load it")


def _broker_config(args: argparse.Namespace) -> None:
    ca = write_broker_config(
        args.dir,
        args.out,
        data_dir=args.data_dir,
        log_file=args.log_file,
        port=args.port,
        mtls_port=args.mtls_port,
        bind=args.bind,
        user=args.user,
        fleet=args.fleet,
        acl_template=args.acl_template,
        include=args.include,
        site=args.site,
    )
    out = args.out.resolve()
    if args.include:
        print(f"wrote {out}; it must be in the include_dir of the main config (Debian: ")
        print("/etc/mosquitto/conf.d/), then: systemctl restart mosquitto")
        print(f"the broker user must read {ca.broker}, e.g.: chown -R {args.user}: {ca.broker}")
        return
    data_dir = args.data_dir.resolve()
    print(f"wrote {out}; run: mosquitto -c {out}")
    if args.site:
        print(f"it holds the bridge's password (0600): chown {args.user}: {out}")
    log_file = args.log_file.resolve()
    print(
        f"the broker user must read {ca.broker} and write {data_dir} and {log_file}, e.g.: "
        f"chown -R {args.user}: {ca.broker} {data_dir}; touch {log_file}; "
        f"chown {args.user}: {log_file}"
    )


def _enroll(args: argparse.Namespace) -> None:
    out = enroll(args.ca, args.device, args.out, args.aggregator_keys, args.fleet)
    print(f"enrolled {args.device}: credentials in {out}; send SIGHUP to the broker")


def _revoke(args: argparse.Namespace) -> None:
    serials = revoke(args.ca, args.device, args.aggregator_keys)
    print(
        f"revoked {args.device} (certificates {', '.join(serials) or 'none'}); "
        f"send SIGHUP to the broker to apply the password file and CRL"
    )


def add_arguments(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``ca``, ``enroll`` and ``revoke`` on the ``fedge`` sub-command parser."""
    ca = sub.add_parser("ca", help="the fleet's certificate authority and broker config")
    csub = ca.add_subparsers(
        dest="ca_cmd", required=True, metavar="{init,fleet,site,crl,broker-config}"
    )
    init = csub.add_parser("init", help="new CA, broker certificate and aggregator identity")
    init.add_argument("--dir", type=Path, required=True, help="new CA directory")
    init.add_argument(
        "--host",
        action="append",
        default=None,
        help="broker host name or IP for its certificate, repeatable "
        f"(default: {' '.join(DEFAULT_HOSTS)})",
    )
    init.add_argument(
        "--fleet",
        default=DEFAULT_FLEET,
        help="the one fleet the broker's ACL allows (default: %(default)s)",
    )
    init.set_defaults(func=_ca_init)
    fl = csub.add_parser(
        "fleet",
        help="add a fleet to the broker: its own aggregator and monitor identities "
        "(aggregator.FLEET, monitor.FLEET), key registry and ACL block",
    )
    fl.add_argument("fleet")
    fl.add_argument("--dir", type=Path, required=True, help="the CA directory")
    fl.set_defaults(func=_ca_fleet)
    st = csub.add_parser(
        "site",
        help="add a site broker bridged to the central one: identities site-SITE (the bridge) "
        "and gw-SITE (its gateway), the site's ACL and bridge.conf, the central ACL block",
    )
    st.add_argument("site")
    st.add_argument("--dir", type=Path, required=True, help="the CA directory")
    st.add_argument(
        "--central-host",
        default="localhost",
        help="the central broker, a name in its certificate (default: %(default)s)",
    )
    st.add_argument("--central-port", type=int, default=8883, help="its TLS + password port")
    st.add_argument(
        "--site-host",
        action="append",
        default=None,
        help="the site broker's host name or IP for its certificate, repeatable "
        f"(default: {' '.join(DEFAULT_HOSTS)})",
    )
    st.add_argument("--fleet", default=None, help="default: the CA's first fleet")
    st.set_defaults(func=_ca_site)
    crl = csub.add_parser("crl", help="re-sign the CRL before its nextUpdate date")
    crl.add_argument("--dir", type=Path, required=True)
    crl.add_argument(
        "--days", type=int, default=CRL_DAYS, help="validity of the CRL (default: %(default)s)"
    )
    crl.set_defaults(func=_ca_crl)
    bc = csub.add_parser("broker-config", help="render broker_config/production.conf")
    bc.add_argument("--dir", type=Path, required=True)
    bc.add_argument(
        "--data-dir", type=Path, default=None, help="persistence directory (not with --include)"
    )
    bc.add_argument("--log-file", type=Path, default=Path("/var/log/mosquitto/mosquitto.log"))
    bc.add_argument("--out", type=Path, required=True)
    bc.add_argument("--port", type=int, default=8883)
    bc.add_argument("--mtls-port", type=int, default=8884)
    bc.add_argument("--bind", default="0.0.0.0")
    bc.add_argument("--user", default="mosquitto", help="user the broker drops to as root")
    bc.add_argument(
        "--fleet", default=None, help="re-render CA/broker/acl for this fleet (default: keep it)"
    )
    bc.add_argument(
        "--acl-template",
        type=Path,
        default=ACL_TEMPLATE,
        help="ACL to pin with --fleet, e.g. broker_config/acl.sharded",
    )
    bc.add_argument(
        "--include",
        action="store_true",
        help="a conf.d include for Debian's stock mosquitto.conf: leave out pid_file, "
        "persistence, persistence_location and log_dest, which it sets",
    )
    bc.add_argument(
        "--site",
        default=None,
        help="render the broker of a site made with fedge ca site (its ACL, certificate, bridge)",
    )
    bc.set_defaults(func=_broker_config)
    en = sub.add_parser("enroll", help="make a device's broker password, certificate, signing key")
    en.add_argument("device")
    en.add_argument("--ca", type=Path, required=True)
    en.add_argument("--out", type=Path, required=True)
    en.add_argument("--aggregator-keys", type=Path, default=None, help="default: CA/keys")
    en.add_argument(
        "--fleet",
        default=None,
        help="a fleet added with fedge ca fleet (default: the CA's first fleet)",
    )
    en.set_defaults(func=_enroll)
    rv = sub.add_parser("revoke", help="revoke a device: password, signing key, certificate")
    rv.add_argument("device")
    rv.add_argument("--ca", type=Path, required=True)
    rv.add_argument("--aggregator-keys", type=Path, default=None, help="default: CA/keys")
    rv.set_defaults(func=_revoke)
