"""A fleet of simulated Rainforest EAGLE gateways on one HTTP port.

It speaks the cloud API and the EAGLE-200 local API, injects faults, and
records what it served so end-to-end tests can check the poller's output.
"""

from poller.simulator.faults import Fault, FaultRates
from poller.simulator.fleet import DEFAULT_ID_OFFSET, cloud_id_for, credentials_for
from poller.simulator.main import Simulator, SimulatorConfig, run_simulator
from poller.simulator.records import ServedReading

__all__ = [
    "DEFAULT_ID_OFFSET",
    "Fault",
    "FaultRates",
    "ServedReading",
    "Simulator",
    "SimulatorConfig",
    "cloud_id_for",
    "credentials_for",
    "run_simulator",
]
