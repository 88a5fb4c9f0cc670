"""The server's Prometheus metrics (prometheus_client): vLLM's quantities under vLLM's names with an `llmnb_` prefix
where vLLM has `vllm:` (`vllm:time_to_first_token_seconds` is `llmnb_time_to_first_token_seconds` here), so a vLLM
dashboard reads them after that one substitution. The histogram buckets are our own, sized for a CPU's latencies."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class Metrics:
    """One registry per server, so two servers in one process (tests) never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.time_to_first_token = Histogram("llmnb_time_to_first_token_seconds", "From arrival to the first generated token",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("llmnb_inter_token_latency_seconds", "Between two tokens of one request",
                                             buckets=TOKEN_BUCKETS, registry=r)
        self.request_latency = Histogram("llmnb_e2e_request_latency_seconds", "From arrival to the last token",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("llmnb_num_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("llmnb_num_requests_waiting", "Sequences waiting for a slot", registry=r)
        self.prompt_tokens = Counter("llmnb_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("llmnb_generation_tokens", "Tokens generated", registry=r)
        self.finished_sequences = Counter("llmnb_request_success", "Sequences finished, by reason", ["finished_reason"], registry=r)

    def finished(self, seq, reason: str | None) -> None:
        self.request_latency.observe(time.perf_counter() - seq.arrived)
        self.generation_tokens.inc(len(seq.tokens))
        self.finished_sequences.labels(finished_reason=reason or "unknown").inc()

    def mean_latency(self) -> float:
        """Mean end-to-end seconds of the requests finished so far (0 before the first)."""
        samples = {s.name: s.value for s in self.request_latency.collect()[0].samples}
        count = samples.get("llmnb_e2e_request_latency_seconds_count", 0)
        return samples["llmnb_e2e_request_latency_seconds_sum"] / count if count else 0.0
