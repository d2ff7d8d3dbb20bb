"""bulkhead-lab: a Bulkhead lab of network namespaces on one machine.

Modules, one job each:
  spec       host specifications and lab addresses (pure)
  state      the state file and the lab directory's layout
  iproute    running `ip`
  topology   namespaces, the bridge (in its own namespace) and the console link
  procs      starting, identifying and stopping background processes
  listener   the lab's small TCP/UDP server and how to start it in a host
  probe      connectivity probes from inside a host (`tcp_probe` for tests)
  daemons    controller and agents: configuration, start, readiness
  lifecycle  up / down / listen, all or nothing
  status     `bulkhead-lab status`
  demo       `bulkhead-lab demo`
  main       the click CLI

Nothing is imported here: `python -m lab.listener` runs in every lab host and should load
only what it needs (and importing it first would make runpy warn).
"""
