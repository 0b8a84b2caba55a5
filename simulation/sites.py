"""Sites on one machine: a central Mosquitto and S site Mosquittos bridged to it by
Mosquitto's own bridge (``broker_config/site.conf.template``), each bridge over a
``WanLink`` that counts the bytes crossing it and can be cut.

    with SiteBrokers(Path("runs/sites"), ["a", "b"], fleet="f1") as sites:
        sites.central.url, sites.site("a").url   # mqtt://127.0.0.1:PORT
        sites.cut("a"); sites.restore("a")
        sites.wan_bytes                          # both directions, every bridge

ACLs: the central broker gets ``broker_config/acl`` plus one ``acl.central-site`` section per
site; each site broker ``acl.site`` for its site.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from fedge.support.shipped import broker_config_dir
from fedge.topics import validate_device_id
from simulation.broker import MosquittoBroker
from simulation.wan import WanLink

__all__ = ["SiteBrokers", "central_acl", "site_acl"]


def central_acl(sites: Sequence[str]) -> str:
    """The central broker's ACL: the fleet's ``acl`` and one bridge section per site."""
    conf = broker_config_dir()
    section = (conf / "acl.central-site").read_text()
    return (conf / "acl").read_text() + "".join(
        section.format(site=validate_device_id(s)) for s in sites
    )


def site_acl(site: str) -> str:
    """A site broker's ACL: its devices, its gateway ``gw-<site>``, its bridge ``site-<site>``."""
    return (broker_config_dir() / "acl.site").read_text().format(site=validate_device_id(site))


class SiteBrokers:
    """A central broker and one bridged broker per site, on loopback."""

    def __init__(self, workdir: Path, sites: Sequence[str], *, fleet: str) -> None:
        if not sites or len(set(sites)) != len(sites):
            raise ValueError(f"sites must be distinct names, got {list(sites)}")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sites = tuple(validate_device_id(s) for s in sites)
        self.fleet = fleet
        acl = self.workdir / "acl.central"
        acl.write_text(central_acl(self.sites))
        self.central = MosquittoBroker(self.workdir / "central", acl=acl)
        self.links: dict[str, WanLink] = {}
        self._sites: dict[str, MosquittoBroker] = {}

    def site(self, name: str) -> MosquittoBroker:
        return self._sites[name]

    def link(self, name: str) -> WanLink:
        return self.links[name]

    @property
    def wan_bytes(self) -> int:
        """Bytes that crossed the bridges, both directions, every site."""
        return sum(link.bytes for link in self.links.values())

    def start(self, timeout: float = 10.0) -> SiteBrokers:
        self.central.start()
        template = broker_config_dir() / "site.conf.template"
        for s in self.sites:
            link = self.links[s] = WanLink(self.central.port).start()
            acl = self.workdir / f"acl.site-{s}"
            acl.write_text(site_acl(s))
            broker = MosquittoBroker(
                self.workdir / f"site-{s}",
                template=template,
                acl=acl,
                params={
                    "fleet": self.fleet,
                    "site": s,
                    "remote_host": "127.0.0.1",
                    "remote_port": link.port,
                },
            )
            self._sites[s] = broker.start()
        self.wait_bridged(timeout)
        return self

    def wait_bridged(self, timeout: float = 10.0) -> None:
        """Until every site's bridge is connected (a connection across each link)."""
        end = time.monotonic() + timeout
        while any(not self._bridged(s) for s in self.sites):
            if time.monotonic() > end:
                down = [s for s in self.sites if not self._bridged(s)]
                raise RuntimeError(f"bridges of sites {down} not connected within {timeout}s")
            time.sleep(0.05)

    def _bridged(self, site: str) -> bool:
        log = self.central.log_path.read_text(errors="replace")
        return f"as site-{site} " in log and self.links[site].connections > 0

    def cut(self, site: str) -> None:
        self.links[site].cut()

    def restore(self, site: str) -> None:
        self.links[site].restore()

    def stop(self) -> None:
        for b in self._sites.values():
            b.stop()
        for link in self.links.values():
            link.stop()
        self.central.stop()

    def __enter__(self) -> SiteBrokers:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
