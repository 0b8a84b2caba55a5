"""Where a simulated fleet's brokers are and how its devices reach them.

- **flat**: one Mosquitto (``simulation.broker``); with ``wan=True`` the devices reach it
  through a ``WanLink``, so the bytes between devices and the centre are counted as the
  sites' bridges are.
- **sites** (``sites`` = S > 0): a central Mosquitto and S site Mosquittos bridged to it
  (``simulation.sites``), a ``SiteGateway`` per site on its broker, device ``i`` at site
  ``i mod S``; the aggregator reduces the gateways' partials.

``wan`` in the summary: bytes and MQTT PUBLISH packets across the wide-area links, both ways.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aggregator.gateway.site import SiteGateway
from fedge.transport.mqtt import BrokerURL
from fedge.transport.mux import Mux
from simulation.broker import CONFIG_DIR, MosquittoBroker
from simulation.sites import SiteBrokers
from simulation.wan import WanLink

__all__ = ["Topology", "site_names"]


def site_names(n: int) -> tuple[str, ...]:
    return tuple(f"s{k}" for k in range(n))


class Topology:
    def __init__(self, out: Path, *, template: Path, acl: Path, sites: int, wan: bool) -> None:
        self.out = out
        self.sites: SiteBrokers | None = None
        self.flat: MosquittoBroker | None = None
        self.link: WanLink | None = None
        self.gateways: list[SiteGateway] = []
        self._template, self._acl, self._n, self._wan = template, acl, sites, wan

    @property
    def site_count(self) -> int:
        return self._n

    def start(self, fleet: str) -> BrokerURL:
        """Start the brokers (the bridges' topic map names ``fleet``); the aggregator's URL."""
        if self._n > 0:
            self.sites = SiteBrokers(self.out / "broker", site_names(self._n), fleet=fleet)
            self.sites.start()
            return BrokerURL.parse(self.sites.central.url)
        self.flat = MosquittoBroker(self.out / "broker", template=self._template, acl=self._acl)
        self.flat.start()
        if self._wan:
            self.link = WanLink(self.flat.port).start()
        return BrokerURL.parse(self.flat.url)

    def device_url(self, i: int) -> BrokerURL:
        if self.sites is not None:
            return BrokerURL.parse(self.sites.site(self.sites.sites[i % self._n]).url)
        assert self.flat is not None
        return BrokerURL.parse((self.link or self.flat).url)

    def start_gateways(self, agg: Any, mux: Mux, keyring: Any, agg_key: Any) -> None:
        """One gateway per site, enforcing what the aggregator does."""
        if self.sites is None:
            return
        from aggregator.gateway.settings import GatewayConfig

        for s in self.sites.sites:
            cfg = GatewayConfig(
                broker=self.sites.site(s).url,
                fleet=agg.fleet,
                site=s,
                state_dir=self.out / "shards" / f"gw-{s}",
                clip_norm=float(agg.strategy_opts.get("clip_norm", 0.0)),
                max_num_samples=agg.max_num_samples,
                max_sample_ratio=agg.max_sample_ratio,
            ).worker_config()
            from dataclasses import replace

            gw = SiteGateway(replace(cfg, aggregator_key=agg_key), mux, keyring=keyring)
            gw.start()
            self.gateways.append(gw)

    def wan(self) -> dict[str, int] | None:
        """Bytes and PUBLISH packets across the wide-area links; None without any."""
        links = list(self.sites.links.values()) if self.sites is not None else []
        if self.link is not None:
            links = [self.link]
        if not links:
            return None
        return {
            "bytes_up": sum(k.up for k in links),
            "bytes_down": sum(k.down for k in links),
            "publish_up": sum(k.publish_up for k in links),
            "publish_down": sum(k.publish_down for k in links),
        }

    def stop_gateways(self) -> None:
        for g in self.gateways:
            g.stop()

    def stop(self) -> None:
        if self.sites is not None:
            self.sites.stop()
        if self.link is not None:
            self.link.stop()
        if self.flat is not None:
            self.flat.stop()


def default_acl(shard_workers: int) -> Path:
    return CONFIG_DIR / ("acl.sharded" if shard_workers else "acl")
