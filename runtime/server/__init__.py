"""`claw runtime serve`: the OpenAI-compatible server with priorities and adaptive offload.

Modules, one concern each: `config` (the YAML file), `protocol` (OpenAI's wire format),
`scheduler` (the local priority queue and batched decode), `monitor` (memory pressure),
`offload` (the remote endpoint), `metrics` (Prometheus) and `app` (the HTTP routes).
"""
