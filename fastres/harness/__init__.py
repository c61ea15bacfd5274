"""The harness: what parity, the self-test, bench and the tests share: cases, one block run
and its float64 reference, the tolerance rule, the one timer, the report. The top layer."""
