"""Sites: ``fedge ca site NAME`` makes what a site broker bridged to the central one needs.

A site (``docs/scaling.md``) is a Mosquitto of its own, bridged to the central broker as the
identity ``site-NAME``, with one gateway aggregator ``gw-NAME`` on it. ``add_site`` writes::

    CA/sites/NAME/site.json           {"site", "fleet", "central_host", "central_port"}
    CA/sites/NAME/site-NAME/          the bridge's identity: its password at the centre
    CA/sites/NAME/gw-NAME/            the gateway's identity on the site broker
    CA/sites/NAME/acl                 the site broker's ACL: broker_config/acl.site, pinned
    CA/sites/NAME/bridge.conf         broker_config/bridge.conf filled in (0600: the password)
    CA/sites/NAME/broker/server.crt   the site broker's TLS certificate (``--site-host``)

and adds the site's block (``broker_config/acl.central-site``, pinned to the fleet) to the
central ``CA/broker/acl``: ``site-NAME`` may write there only ``partial/gw-NAME``, statuses and
its bridge notification, and reads the model, round and release topics through the pattern
lines. The block is re-rendered with the rest of the ACL whenever a fleet is added
(``fedge_cli.pki.fleets.write_ca_acl`` calls ``site_acl_blocks``).

``site-*`` and ``gw-*`` are reserved: ``fedge enroll`` refuses them (``RESERVED_PREFIXES``), so
no device can take a site's bridge or gateway name before its site exists.

The site broker shares the CA's password file and CRL: ``fedge ca broker-config --site NAME``
renders ``production.conf`` with the site's ACL and server certificate and appends its
``bridge.conf`` (``render_site_broker_config``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from fedge.errors import ConfigError
from fedge.support.shipped import broker_config_dir
from fedge.topics import validate_device_id
from fedge_cli.pki.acl import render_acl
from fedge_cli.pki.cadir import CaDir, load_record, write_file

__all__ = [
    "GATEWAY_PREFIX",
    "RESERVED_PREFIXES",
    "SITE_PREFIX",
    "SiteFiles",
    "add_site",
    "added_sites",
    "site_acl_blocks",
    "site_files",
]

SITE_PREFIX = "site-"  # the bridge's identity at both ends
GATEWAY_PREFIX = "gw-"  # the site's gateway aggregator
RESERVED_PREFIXES = (SITE_PREFIX, GATEWAY_PREFIX)
DEFAULT_CENTRAL_PORT = 8883
_SHIPPED = broker_config_dir()


@dataclass(frozen=True)
class SiteFiles:
    """Where one site's files are in a CA directory (module docstring)."""

    site: str
    home: Path

    record = property(lambda s: s.home / "site.json")
    bridge = property(lambda s: s.home / f"{SITE_PREFIX}{s.site}")  # identity directory
    gateway = property(lambda s: s.home / f"{GATEWAY_PREFIX}{s.site}")
    acl = property(lambda s: s.home / "acl")
    bridge_conf = property(lambda s: s.home / "bridge.conf")
    server_crt = property(lambda s: s.home / "broker" / "server.crt")
    server_key = property(lambda s: s.home / "broker" / "server.key")
    bridge_name = property(lambda s: f"{SITE_PREFIX}{s.site}")
    gateway_name = property(lambda s: f"{GATEWAY_PREFIX}{s.site}")


def _sites_root(ca: CaDir) -> Path:
    return ca.root / "sites"


def site_files(ca: CaDir, site: str) -> SiteFiles:
    """``site``'s files (whether or not they exist yet)."""
    return SiteFiles(validate_device_id(site), _sites_root(ca) / site)


def added_sites(ca: CaDir) -> list[str]:
    """The sites made with ``fedge ca site``, in name order."""
    root = _sites_root(ca)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "site.json").is_file())


def _fill(text: str, values: dict[str, object]) -> str:
    for name, value in values.items():
        text = text.replace("{" + name + "}", str(value))
    return text


def central_block(site: str, fleet: str) -> str:
    """The central ACL's section for ``site``: ``acl.central-site`` pinned to ``fleet``."""
    text = (_SHIPPED / "acl.central-site").read_text()
    return render_acl(_fill(text, {"site": validate_device_id(site)}), fleet)


def site_acl_blocks(ca: CaDir) -> str:
    """The central ACL's sections of every site of the CA (appended by ``write_ca_acl``)."""
    blocks = []
    for site in added_sites(ca):
        record = json.loads(site_files(ca, site).record.read_text())
        blocks.append("\n" + central_block(site, record["fleet"]))
    return "".join(blocks)


def add_site(
    ca_dir: Path,
    site: str,
    *,
    central_host: str = "localhost",
    central_port: int = DEFAULT_CENTRAL_PORT,
    fleet: str | None = None,
    site_hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
) -> SiteFiles:
    """Site ``site``'s identities, ACLs, server certificate and bridge (module docstring).

    ``central_host`` must be a name in the central broker's certificate (the bridge checks
    it); ``fleet``: default the CA's first fleet.
    """
    from fedge_cli.pki.certs import cert_pem, issue_certificate, key_pem, new_key
    from fedge_cli.pki.credentials import give_aggregator_key, issue_credentials
    from fedge_cli.pki.fleets import _record, fleet_identities, write_ca_acl

    ca = CaDir(Path(ca_dir).resolve()).require()
    files = site_files(ca, site)
    record = _record(ca)
    ids = fleet_identities(ca, fleet)
    if files.home.exists():
        raise ConfigError(f"site {site!r} is already in the CA {ca.root}")
    validate_device_id(files.bridge_name)
    validate_device_id(files.gateway_name)
    taken = [n for n in (files.bridge_name, files.gateway_name) if load_record(ca, n)]
    if taken:
        raise ConfigError(f"{taken[0]!r} is already enrolled (as a device?): revoke it first")
    if not site_hosts:
        raise ConfigError("the site broker's certificate needs at least one --site-host")
    site_acl = render_acl(_fill((_SHIPPED / "acl.site").read_text(), {"site": site}), ids.fleet)
    bridge_tpl = (_SHIPPED / "bridge.conf").read_text()
    files.home.mkdir(parents=True)
    try:
        os.chmod(files.home, 0o700)
        issue_credentials(ca, files.bridge_name, files.bridge)
        issue_credentials(ca, files.gateway_name, files.gateway)
        give_aggregator_key(ca, files.gateway, source=ids.aggregator)
        files.server_key.parent.mkdir()
        key = new_key()
        cert = issue_certificate(ca, site_hosts[0], key, server_names=site_hosts)
        write_file(files.server_key, key_pem(key), 0o640)
        write_file(files.server_crt, cert_pem(cert), 0o644)
        write_file(files.acl, site_acl.encode(), 0o644)
        bridge = _fill(
            bridge_tpl,
            {
                "fleet": ids.fleet,
                "site": site,
                "remote_host": central_host,
                "remote_port": central_port,
                "remote_password": (files.bridge / "password").read_text().strip(),
                "bridge_cafile": ca.ca_crt,
            },
        )
        write_file(files.bridge_conf, bridge.encode(), 0o600)
        meta = {
            "site": site,
            "fleet": ids.fleet,
            "central_host": central_host,
            "central_port": central_port,
        }
        write_file(files.record, json.dumps(meta, indent=2).encode(), 0o644)
        write_ca_acl(ca, record["fleet"], Path(record["acl_template"]))
    except BaseException:
        # Half a site would be refused by the next `ca site` ("already in the CA").
        shutil.rmtree(files.home, ignore_errors=True)
        raise
    return files


def render_site_broker_config(ca_dir: Path, site: str, template: Path, **values: object) -> str:
    """``template`` (``production.conf``) for ``site``'s broker: the CA's password file, CA
    certificate and CRL, the site's ACL and server certificate, then its ``bridge.conf``."""
    from fedge_cli.pki.broker_config import render_broker_config

    ca = CaDir(Path(ca_dir).resolve()).require()
    files = site_files(ca, site)
    if not files.record.is_file():
        raise ConfigError(f"site {site!r} is not in the CA {ca.root}: fedge ca site {site}")
    merged: dict[str, object] = {
        "acl_file": files.acl,
        "certfile": files.server_crt,
        "keyfile": files.server_key,
        **values,
    }
    text = render_broker_config(ca.root, template, **merged)
    return (
        text
        + "\n# --- the bridge to the central broker (fedge ca site) ---\n"
        + (files.bridge_conf.read_text())
    )
