"""The benchmark harness behind `fastguide bench`: end-to-end images/s (end_to_end), per-step sampler overhead
(overhead) and the guided-step kernel (kernel). Acceptance thresholds live in benchmarks/, not here."""
