"""First come, first served: vLLM's default and lessons 04–05's only policy.

The behaviour lives in `minisys.scheduling.policy.SchedulingPolicy`, the base
class every other policy refines; this module names it.
"""
from .policy import SchedulingPolicy as FCFSPolicy

__all__ = ["FCFSPolicy"]
