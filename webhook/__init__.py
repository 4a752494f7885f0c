"""bpfinit admission webhook: swaps Istio's iptables istio-init for the bpfinit eBPF agent.

Transport (app, admission, server, certs, metrics, logs, cli) is kept apart from the
pure pod logic (mutate, annotations; validate/policy for the egress policy).
"""
