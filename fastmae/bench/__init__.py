"""Speed and FLOP measurement: step benchmarks, Table 2, per-component profile."""
