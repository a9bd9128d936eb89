"""The device drivers, by the name stored in ``devices.driver``.

>>> driver_names()
('eagle-cloud', 'eagle-local', 'http-json')
>>> get_driver("eagle-cloud", cloud_base_url="https://rainforestcloud.com:9445").name
'eagle-cloud'
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from poller.drivers.base import Driver
from poller.drivers.eagle_cloud import EagleCloudDriver
from poller.drivers.eagle_local import EagleLocalDriver
from poller.drivers.http_json import HttpJsonDriver

DriverFactory = Callable[[str], Driver]
"""Makes a driver from the global cloud base URL (which most ignore)."""

DRIVERS: Mapping[str, DriverFactory] = MappingProxyType(
    {
        EagleCloudDriver.name: EagleCloudDriver,
        EagleLocalDriver.name: lambda cloud_base_url: EagleLocalDriver(),
        HttpJsonDriver.name: lambda cloud_base_url: HttpJsonDriver(),
    }
)


def driver_names() -> tuple[str, ...]:
    """The registered driver names, sorted."""
    return tuple(sorted(DRIVERS))


def get_driver(name: str, *, cloud_base_url: str) -> Driver:
    """The driver called ``name``. ValueError for an unknown name or a bad
    ``cloud_base_url``."""
    factory = DRIVERS.get(name)
    if factory is None:
        raise ValueError(f"unknown driver {name!r}; known: {', '.join(driver_names())}")
    return factory(cloud_base_url)


__all__ = ["DRIVERS", "DriverFactory", "driver_names", "get_driver"]
