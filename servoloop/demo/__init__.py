"""`servoloop demo`: the closed loop in one command (the system, simulated users, the report).

    from servoloop.demo import DemoPlan, demo_settings, run_demo
"""

from __future__ import annotations

from servoloop.demo.plan import DemoPlan, demo_settings
from servoloop.demo.run import DemoFailed, run_demo

__all__ = ["DemoFailed", "DemoPlan", "demo_settings", "run_demo"]
