"""The production Mosquitto config, rendered from ``broker_config/production.conf`` for a CA.

Before writing it, ``write_broker_config`` checks that the broker (started as root, it drops to
``--user``) can write its data directory and read its key, password file and CRL: otherwise
Mosquitto would start, log "Permission denied" once, and lose every session and retained model
on restart (persistence), or refuse every TLS client (key, CRL).

Every path in the config is absolute (a service manager starts Mosquitto from ``/``), and the
file is written 0644: Mosquitto re-reads it on SIGHUP after dropping to its user, and a file
only root can read makes every reload fail with ``Unable to open config file``. It holds paths,
no secrets.

With ``include=True`` it is rendered for Debian's ``/etc/mosquitto/conf.d/``: the stock
``/etc/mosquitto/mosquitto.conf`` already sets ``pid_file``, ``persistence``,
``persistence_location`` and ``log_dest file``, and Mosquitto exits on a second
``persistence_location`` or ``log_dest file`` ("Duplicate ... value"), so those lines are left
out and the broker keeps the stock data directory and log.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from fedge.errors import ConfigError
from fedge.support.fsutil import atomic_write
from fedge.support.shipped import broker_config_dir
from fedge_cli.pki.cadir import CaDir

__all__ = [
    "ACL_TEMPLATE",
    "PRODUCTION_TEMPLATE",
    "access_problem",
    "render_broker_config",
    "write_broker_config",
]

PRODUCTION_TEMPLATE = broker_config_dir() / "production.conf"
ACL_TEMPLATE = PRODUCTION_TEMPLATE.parent / "acl"
CONFIG_MODE = 0o644
# What Debian's stock mosquitto.conf sets before its include_dir (mosquitto 2.0.11-1.2).
STOCK_SETTINGS = frozenset({"pid_file", "persistence", "persistence_location", "log_dest"})


def render_broker_config(
    ca_dir: Path, template: Path = PRODUCTION_TEMPLATE, **values: object
) -> str:
    """``production.conf`` with the CA's files filled in, and ``values`` for the rest.

    Placeholders not given stay as ``{name}``, so a caller (the test suite, through
    ``simulation.broker.MosquittoBroker``) can fill ``{port}``, ``{data_dir}``, ``{acl_file}``
    and ``{log_file}`` itself.
    """
    ca = CaDir(Path(ca_dir).resolve()).require()
    filled: dict[str, object] = {
        "password_file": ca.passwd,
        "cafile": ca.ca_crt,
        "certfile": ca.server_crt,
        "keyfile": ca.server_key,
        "crlfile": ca.crl,
        "acl_file": ca.acl,
        **values,
    }
    text = Path(template).read_text()
    for name, value in filled.items():
        text = text.replace("{" + name + "}", str(value))
    return text


def as_include(text: str) -> str:
    """``text`` without the settings Debian's stock ``mosquitto.conf`` already makes."""
    kept = [
        line
        for line in text.splitlines(keepends=True)
        if not (line.split() and line.split()[0] in STOCK_SETTINGS)
    ]
    head = (
        "# A conf.d include for Debian's stock /etc/mosquitto/mosquitto.conf, which sets\n"
        f"# {', '.join(sorted(STOCK_SETTINGS))}: they are left out here.\n"
    )
    return head + "".join(kept)


def write_broker_config(
    ca_dir: Path,
    out: Path,
    *,
    data_dir: Path | None,
    log_file: Path,
    port: int,
    mtls_port: int,
    bind: str,
    user: str,
    fleet: str | None = None,
    acl_template: Path = ACL_TEMPLATE,
    include: bool = False,
    site: str | None = None,
) -> CaDir:
    """Check the broker user's access (module docstring), render the config, write ``out``.

    ``include``: for Debian's ``conf.d`` (module docstring); ``data_dir`` is then the stock
    one and may be None.

    With ``fleet``, ``CA/broker/acl`` is first rendered anew from ``acl_template`` pinned to
    that fleet (``fedge_cli.pki.acl.render_acl``), with the blocks of the fleets added by
    ``fedge ca fleet`` after it (``fedge_cli.pki.fleets``); without it the CA's ACL stays as
    it is (``fedge ca init`` pinned it to its ``--fleet``).

    With ``site`` (made by ``fedge ca site``), the config of that site's broker: its ACL and
    server certificate, its bridge to the central broker appended
    (``fedge_cli.pki.sites.render_site_broker_config``); written 0600, as it holds the
    bridge's password (the broker user must own it to re-read it on SIGHUP).
    """
    from fedge_cli.pki.fleets import write_ca_acl
    from fedge_cli.pki.sites import render_site_broker_config, site_files

    ca = CaDir(Path(ca_dir).resolve()).require()
    if include and data_dir is not None:
        raise ConfigError(
            "leave out --data-dir with --include: the main config's persistence_location is used"
        )
    if data_dir is None:
        if not include:
            raise ConfigError("a data directory is needed unless the config is an --include")
        data_dir = Path("/var/lib/mosquitto")
    data_dir, log_file = Path(data_dir).resolve(), Path(log_file).resolve()
    if fleet is not None:
        write_ca_acl(ca, fleet, Path(acl_template))
    if not data_dir.is_dir():
        raise ConfigError(
            f"data directory {data_dir} does not exist; create it for the broker user"
        )
    problem = None if include else access_problem(data_dir, user, write=True)
    server_key = ca.server_key if site is None else site_files(ca, site).server_key
    # One command that fixes all three (fixing them one by one took three runs).
    problem = problem or next(
        (
            p
            for f in (server_key, ca.passwd, ca.crl)
            if (p := access_problem(f, user, fix=f"chown -R {user}: {ca.broker}"))
        ),
        None,
    )
    if problem:
        raise ConfigError(problem)
    where: dict[str, object] = {"port": port, "mtls_port": mtls_port, "bind": bind}
    where |= {"data_dir": data_dir, "log_file": log_file}
    if site is None:
        text = render_broker_config(ca.root, PRODUCTION_TEMPLATE, **where)
    else:
        text = render_site_broker_config(ca.root, site, PRODUCTION_TEMPLATE, **where)
    if include:
        text = as_include(text)
    left = sorted(set(re.findall(r"\{(\w+)\}", text)))
    if left:
        raise ConfigError(f"unfilled placeholders in the template: {', '.join(left)}")
    mode = CONFIG_MODE if site is None else 0o600
    atomic_write(out, text.encode(), mode=mode, keep_owner=site is not None)
    return ca


def access_problem(
    path: Path, user: str, write: bool = False, fix: str | None = None
) -> str | None:
    """Why the broker, started as root and dropping to ``user``, could not use ``path``;
    ``fix``: the command to suggest (default ``chown USER: PATH``)."""
    import grp
    import pwd

    want = "writable" if write else "readable"
    if os.geteuid() != 0:  # Mosquitto runs as whoever starts it: our access is its access
        ok = os.access(path, (os.W_OK | os.X_OK) if write else os.R_OK)
        return None if ok else f"{path} is not {want} by this user"
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return f"no user {user!r} on this machine: the broker drops to it when started as root"
    st = path.stat()
    gids = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    shift = 6 if st.st_uid == pw.pw_uid else 3 if st.st_gid in gids else 0
    need = 0o3 if write else 0o4
    if (st.st_mode >> shift) & need != need:
        fix = fix or f"chown {user}: {path}"
        return f"{path} is not {want} by the broker user {user!r}; run: {fix}"
    return None
