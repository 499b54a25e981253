"""A simulated legacy REST API and its Cognito-like token endpoint, on loopback.

The product's test bed (fault injection), its demo, and a benchmark source.
It imports nothing from the rest of etl.
"""

from .app import Counters, Faults
from .server import Simulator, SimulatorSettings, demo_settings

__all__ = ["Counters", "Faults", "Simulator", "SimulatorSettings", "demo_settings"]
