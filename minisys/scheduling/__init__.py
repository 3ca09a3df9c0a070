"""Scheduling policies (lesson 08): who is admitted next, who is preempted.

    fcfs      `policy.SchedulingPolicy` (the base: first come, first served)
    priority  `priority.PriorityPolicy` (vLLM's: lower value first, may preempt)
    vtc       `vtc.VTCPolicy` (fair share per client: the virtual token counter)
    andes     `andes.AndesPolicy` (quality of experience of streamed text)

`qoe` defines the QoE of a delivered-token timeline; `service` measures the
weighted service each client received. The `Scheduler` (lessons 04–05) keeps
the mechanics; a policy only chooses (see `policy`).
"""
from .andes import AndesPolicy
from .policy import SchedulingPolicy, make_policy
from .priority import PriorityPolicy
from .qoe import QoESpec, qoe
from .service import ServiceMeter, max_service_gap
from .vtc import VTCPolicy, fairness_bound

__all__ = ["AndesPolicy", "PriorityPolicy", "QoESpec", "SchedulingPolicy", "ServiceMeter", "VTCPolicy",
           "fairness_bound", "make_policy", "max_service_gap", "qoe"]
