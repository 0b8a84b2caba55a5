"""Fleet identity: the CA, broker passwords, enrolment and revocation, the broker's config.

The commands (``fedge ca init|fleet|site|crl|broker-config``, ``fedge enroll``,
``fedge revoke``) are in ``fedge_cli.admin``; the work is here, one module per job::

    cadir.py          the CA directory's layout and its issued-certificate records
    certs.py          ECDSA P-256 keys, the self-signed CA, certificates it issues
    ca.py             ``ca init`` (CA, broker files, key registry, aggregator) and the CRL
    passwords.py      Mosquitto's password file (``$7$`` PBKDF2-SHA512)
    credentials.py    one identity's password, client certificate and signing key
    enrolment.py      ``enroll`` / ``revoke``
    acl.py            the ACL pinned to one fleet; the names it gives more than a device's rights
    fleets.py         ``ca fleet``: more fleets on one broker, each with its own identities
    sites.py          ``ca site``: a site broker's bridge and gateway identities, ACLs, bridge
    broker_config.py  ``production.conf`` rendered for a CA, with the broker user's access checked

A CA directory (``fedge ca init --dir CA``) holds everything the fleet's trust rests on::

    CA/ca.crt                   the fleet CA certificate (public: every client and the broker)
    CA/private/ca.key           its key, 0600 (keep this directory offline if you can)
    CA/broker/                  what Mosquitto reads: server.crt/.key, passwd, crl.pem, acl
    CA/issued/<id>.json         certificates issued to an identity, and whether revoked
    CA/keys/devices/<id>.pub    the key registry the aggregator reads (fedge.key_registry)
    CA/keys/revoked/<id>-<fp>.pub   keys of revoked devices
    CA/aggregator/              the aggregator's own identity (made by ``ca init``)
    CA/monitor/                 ``fedge status``'s read-only identity (made by ``ca init``)
    CA/fleet.json               the first fleet and the ACL template (``fedge_cli.pki.fleets``)
    CA/fleets/<G>/              a fleet added by ``ca fleet G``: aggregator/, monitor/, keys/
    CA/sites/<S>/               a site added by ``ca site S``: site-S/, gw-S/, acl, bridge.conf

An identity directory (``enroll`` output, and ``CA/aggregator``) holds ``password`` (0600),
``client.crt`` + ``client.key`` (0600), ``ca.crt``, ``signing.key`` (Ed25519, 0600),
``signing.pub``, ``aggregator.pub`` (the key that signs models) and ``identity.json``.

TLS certificates are ECDSA P-256 (every TLS stack a device may carry speaks it); signing keys
are Ed25519 (``fedge.identity``). Broker passwords are random 32-character tokens, hashed into
the password file by ``mosquitto_passwd`` (fed on stdin, so the password never shows in a
process list) or, where it is not installed, in its ``$7$`` PBKDF2-SHA512 format directly.
"""

from fedge_cli.pki.acl import privileged_names, render_acl
from fedge_cli.pki.broker_config import (
    ACL_TEMPLATE,
    PRODUCTION_TEMPLATE,
    render_broker_config,
    write_broker_config,
)
from fedge_cli.pki.ca import CRL_DAYS, DEFAULT_FLEET, DEFAULT_HOSTS, init_ca, write_crl
from fedge_cli.pki.cadir import AGGREGATOR, MONITOR, CaDir
from fedge_cli.pki.enrolment import enroll, revoke
from fedge_cli.pki.fleets import add_fleet
from fedge_cli.pki.passwords import hash_password, remove_password, set_password, verify_password
from fedge_cli.pki.sites import add_site

__all__ = [
    "ACL_TEMPLATE",
    "AGGREGATOR",
    "CRL_DAYS",
    "DEFAULT_FLEET",
    "DEFAULT_HOSTS",
    "MONITOR",
    "PRODUCTION_TEMPLATE",
    "CaDir",
    "add_fleet",
    "add_site",
    "enroll",
    "hash_password",
    "init_ca",
    "privileged_names",
    "remove_password",
    "render_acl",
    "render_broker_config",
    "revoke",
    "set_password",
    "verify_password",
    "write_broker_config",
    "write_crl",
]
