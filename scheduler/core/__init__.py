"""The pure core of the control plane: value types, placement, the queue policy, preemption
choice, autoscaling, the state machines. No I/O, no clock reads: time is an argument.

The live loop (``scheduler.batch``, ``scheduler.realtime``) and the trace simulator
(``scheduler.sim``) run the same code.
"""
