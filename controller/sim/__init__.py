"""bulkhead-sim: simulated agents for load and latency measurements of the controller.

It speaks the agent's side of bulkhead.v1 (enrollment, the stream, acks, heartbeats)
without a dataplane, for thousands of agents in one asyncio process. It imports nothing
of the agent package (agent and controller never import each other).

    spec         what each agent is: id, labels from --labels-from patterns, fake address
    credentials  keys and certificates cached on disk between runs
    enroll       pinning the CA from a token, enrolling a fleet with bounded concurrency
    agents       one simulated agent's stream (SimAgent)
    fleet        N agents, reconnect with jittered backoff, given-up counts (Fleet)
    stats        latency percentiles
    harness      a controller process of our own on 127.0.0.1 (LocalController)
    benchmark    convergence rounds and the reconnect storm (bench/convergence_bench.py)
    main         the `bulkhead-sim` command
"""
